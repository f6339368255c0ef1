"""The LM part of the stage I objective, all recurrent steps in one pass:

    loss = sum_t sum_i p_ti CE_ti,   CE_ti = CE(lm_head(h_ti), target_i)

with exit weights p (R, n) that depend only on the gates, never on CE. The loss is a scalar,
so its gradients w.r.t. the step states and the head weight are known as soon as a chunk's
logits are: d loss / d logits = p (softmax - one_hot(target)). `exit_weighted_cross_entropy`
computes them in forward, chunk by chunk (logits -> exponentials in place -> d logits in place
-> d h, and d W accumulated into one fp32 buffer across steps and chunks); backward only
scales them by the upstream scalar, and d p = CE x upstream. The entropy term of the objective
stays in plain autograd through p.

Where the per-step path (`linear_cross_entropy` once per step) spent its time, torch.profiler
on 2 CPU threads, R=4 x 2048 tokens x 49,152 vocab, hidden 256, chunk 512, fp32: 26.2 s of
35.2 s in 64 matmuls (16 chunks x 4: forward logits; in backward the recomputed logits, d h,
d W) and 6.6 s in 32 exp passes (forward log-sum-exp, backward softmax of the recomputed
logits). All add_ together (the per-chunk weight-gradient sums and autograd's sum of the R
steps' (V, H) gradients) took 0.25 s, the index_select copies of the states 9 ms, dtype
copies nothing in fp32. Here a chunk costs 3 matmuls and 1 exp (the naive loss's count).

Memory: at most one chunk x V/tp of logits at once (plus its bf16 copy under autocast; the next
chunk's matmul runs after the last one is freed), the (R, n, H) state gradients and one fp32
(V/tp, H) weight gradient saved from forward to backward (the per-step path's backward makes,
per step, its own (V, H) gradient and a (V, H) product per chunk, and autograd sums the R
gradients), and their scaled copies in backward. Under `torch.no_grad()`, or when nothing requires grad, only the
loss and CE are computed.

Vocabulary split over a tensor-parallel group (`group`, `vocab_start`) as in
`linear_cross_entropy`: the row max and sum of exponentials are all-reduced per chunk, the
target logits once at the end; d h sums every vocabulary shard, so it is all-reduced; d W stays
local to the shard.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from ouro_train.kernels.linear_cross_entropy import (
    IGNORE_INDEX,
    _exp_shifted_,
    _local_targets,
    _softmax_dtype,
    linear_cross_entropy_reference,
)


def exit_weighted_cross_entropy_reference(
    states: Sequence[torch.Tensor],
    weight: torch.Tensor,
    targets: torch.Tensor,
    exit_weights: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every step's logits materialised (autograd keeps them all): the tests' reference."""
    ce = torch.stack([linear_cross_entropy_reference(h, weight, targets, ignore_index) for h in states])  # (R, n)
    return (exit_weights * ce).sum(), ce


def _chunked_pass(
    states: Sequence[torch.Tensor],
    weight: torch.Tensor,
    targets: torch.Tensor,
    exit_weights: torch.Tensor,
    chunk_size: int,
    ignore_index: int,
    vocab_start: int,
    group: dist.ProcessGroup | None,
    grad_states: bool,
    grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """-> (loss, CE (R, n), d loss / d states (R, n, H) or None, d loss / d weight or None)."""
    steps, num_tokens, device = len(states), targets.shape[0], targets.device
    compute = _softmax_dtype(states[0])
    valid = targets != ignore_index
    local_targets, mine = _local_targets(targets, valid, vocab_start, weight.shape[0], group is not None)
    lse = torch.empty(steps, num_tokens, dtype=compute, device=device)
    target_logit = torch.empty(steps, num_tokens, dtype=compute, device=device)
    scale = exit_weights.to(compute) * valid  # (R, n): d loss / d CE_ti
    target_scale = scale * mine  # the one-hot term, only where this shard owns the target
    d_states = (
        torch.empty(steps, num_tokens, weight.shape[1], dtype=states[0].dtype, device=device) if grad_states else None
    )
    # One fp32 weight gradient for all steps and chunks: summing many bf16 partial products
    # would lose the small ones.
    d_weight = (
        torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=device)
        if grad_weight
        else None
    )
    for step, hidden in enumerate(states):  # (n, H) each
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            h = hidden[start:end]  # (C, H)
            logits = (h @ weight.t()).to(compute)  # (C, V_local)
            picked = logits.gather(1, local_targets[start:end, None]).squeeze(1)  # before the in-place exp
            target_logit[step, start:end] = torch.where(mine[start:end], picked, 0.0)
            lse[step, start:end], sum_exp = _exp_shifted_(logits, group)  # logits now exp(logits - max)
            if d_states is None and d_weight is None:
                del logits  # before the next chunk's matmul, so that two chunks never coexist
                continue
            # d loss / d logits = p (softmax - one_hot(target)), in place on the exponentials.
            dlogits = logits.mul_((scale[step, start:end] / sum_exp)[:, None])
            rows = torch.arange(end - start, device=device)
            dlogits[rows, local_targets[start:end]] -= target_scale[step, start:end]
            dlogits = dlogits.to(h.dtype)  # the matmul dtype (bf16 under autocast)
            if d_states is not None:
                torch.mm(dlogits, weight, out=d_states[step, start:end])
            if d_weight is not None:
                if dlogits.dtype == d_weight.dtype:
                    d_weight.addmm_(dlogits.t(), h)  # no (V, H) temporary
                else:
                    d_weight.add_(dlogits.t() @ h)  # bf16 product, summed in fp32
            del logits, dlogits  # before the next chunk's matmul, so that two chunks never coexist
    if group is not None:
        dist.all_reduce(target_logit, group=group)  # each target logit comes from its owner
        if d_states is not None:
            # The states are replicated over the group; their gradient sums every vocab shard.
            dist.all_reduce(d_states, group=group)
    ce = (lse - target_logit) * valid  # (R, n)
    return (scale * ce).sum(), ce, d_states, d_weight


class _ExitWeightedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, targets, exit_weights, chunk_size, ignore_index, vocab_start, group, *states):
        grad_states = any(ctx.needs_input_grad[7:])
        loss, ce, d_states, d_weight = _chunked_pass(
            states,
            weight,
            targets,
            exit_weights,
            chunk_size,
            ignore_index,
            vocab_start,
            group,
            grad_states=grad_states,
            grad_weight=ctx.needs_input_grad[0],
        )
        ctx.mark_non_differentiable(ce)
        ctx.save_for_backward(d_states, d_weight, ce)
        ctx.weight_dtype, ctx.exit_weights_dtype = weight.dtype, exit_weights.dtype
        return loss, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce):
        d_states, d_weight, ce = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_weight = (d_weight * grad_loss).to(ctx.weight_dtype) if needs[0] else None
        grad_exit_weights = (ce * grad_loss).to(ctx.exit_weights_dtype) if needs[2] else None
        grad_states = [d_states[step] * grad_loss if needed else None for step, needed in enumerate(needs[7:])]
        return grad_weight, None, grad_exit_weights, None, None, None, None, *grad_states


def exit_weighted_cross_entropy(
    states: Sequence[torch.Tensor] | torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    exit_weights: torch.Tensor,
    chunk_size: int = 4096,
    ignore_index: int = IGNORE_INDEX,
    *,
    vocab_start: int = 0,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """states: R tensors (n, H) (or one (R, n, H)), weight (V, H), targets (n,), exit_weights
    (R, n) -> (sum_t sum_i p_ti CE_ti as a differentiable scalar, CE (R, n) detached), in fp32
    at least; CE is 0 where the target is `ignore_index`.

    With `group`, the states are replicated over the group and `weight` holds this rank's
    vocabulary rows [vocab_start, vocab_start + weight.shape[0]); every rank gets the full loss."""
    states = list(states)
    num_tokens = targets.shape[0]
    if targets.dim() != 1 or any(h.dim() != 2 or h.shape[0] != num_tokens for h in states):
        raise ValueError(
            f"expected states of (n, H) and targets (n,), got {[tuple(h.shape) for h in states]} and "
            f"{tuple(targets.shape)}"
        )
    if exit_weights.shape != (len(states), num_tokens):
        raise ValueError(f"expected exit_weights ({len(states)}, {num_tokens}), got {tuple(exit_weights.shape)}")
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    device_type = targets.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:
        # As linear_cross_entropy: the matmuls in the autocast dtype, explicitly, because
        # autocast does not reach inside autograd.Function; softmax statistics stay fp32.
        dtype = torch.get_autocast_dtype(device_type)
        states, weight = [h.to(dtype) for h in states], weight.to(dtype)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (weight, exit_weights, *states))
    with torch.autocast(device_type=device_type, enabled=False):
        if not needs_grad:  # no gradient work at all: evaluation, stage II's CE targets
            with torch.no_grad():
                loss, ce, _, _ = _chunked_pass(
                    states, weight, targets, exit_weights, chunk_size, ignore_index, vocab_start, group, False, False
                )
            return loss, ce
        return _ExitWeightedCrossEntropy.apply(
            weight, targets, exit_weights, chunk_size, ignore_index, vocab_start, group, *states
        )
