"""Linear + cross-entropy without materialising the logits of all tokens.

A LoopLM reads logits after every recurrent step: 4 steps x 49,152 vocab x 64K tokens would be
50 GB in fp32. `linear_cross_entropy` computes per-token CE chunk by chunk (at most
`chunk_size x vocab` logits alive at once) and recomputes each chunk's logits in backward
instead of saving them. It returns per-token losses so that the objective can weight them by
the exit probabilities p(t) (and differentiate through those weights).

Vocabulary split over a tensor-parallel group (`group`, `vocab_start`): each rank holds rows
[vocab_start, vocab_start + V/tp) of the LM head and computes its slice of every chunk's
logits; the log-sum-exp (max, then sum of exponentials) and the target logit (from the shard
that owns it) are completed with all-reduces over (chunk,) vectors, never over logits.
Backward recomputes the local logits; d hidden sums every vocabulary shard, so it is
all-reduced. At most `chunk x V/tp` logits exist at once. Without a group (or with a group of
one) this is the single-device loss.

Cost: one extra (tokens x hidden x vocab) matmul per call versus the naive loss (the forward
logits are recomputed in backward); memory: O(chunk x vocab) instead of O(tokens x vocab).
`linear_cross_entropy_reference` is the plain torch version the tests compare against.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """hidden (T, H), weight (V, H), targets (T,) -> per-token CE (T,), 0 where ignored."""
    logits = (hidden @ weight.t()).to(_softmax_dtype(hidden))
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")


def _softmax_dtype(hidden: torch.Tensor) -> torch.dtype:
    # fp32 at least (bf16 logsumexp over 49K entries is too coarse); float64 stays float64 so
    # that gradcheck sees the true function.
    return torch.promote_types(hidden.dtype, torch.float32)


def _exp_shifted_(logits: torch.Tensor, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: logits (C, V_local) become exp(logits - m), m the row max over every shard of
    `group`. -> (log-sum-exp (C,), sum of the exponentials (C,)), both over the whole vocabulary.

    In place, so that the exit-weighted objective reuses the exponentials as its softmax (divided
    by the sum) instead of a second exp pass; no shifted copy either (`torch.logsumexp` makes
    one: 161 ms vs 139 ms on a (512, 49152) fp32 chunk, 2 CPU threads)."""
    row_max = logits.max(dim=-1).values
    if group is not None:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    sum_exp = logits.sub_(row_max[:, None]).exp_().sum(-1)
    if group is not None:
        dist.all_reduce(sum_exp, group=group)
    return row_max + sum_exp.log(), sum_exp


def _local_targets(
    targets: torch.Tensor, valid: torch.Tensor, vocab_start: int, vocab_local: int, sharded: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (targets as indices into this shard, 0 where not owned; which tokens this shard owns).
    Unsharded, every valid token is owned: an out-of-range target then fails in `gather`."""
    local = targets - vocab_start
    mine = valid & (local >= 0) & (local < vocab_local) if sharded else valid
    return torch.where(mine, local, 0), mine


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, ignore_index: int, vocab_start: int, group):
        num_tokens = hidden.shape[0]
        compute = _softmax_dtype(hidden)
        # Per-token log-sum-exp, kept for backward: softmax there is exp(logits - lse), one pass.
        lse = torch.empty(num_tokens, dtype=compute, device=hidden.device)
        target_logit = torch.empty(num_tokens, dtype=compute, device=hidden.device)
        valid = targets != ignore_index
        local_targets, mine = _local_targets(targets, valid, vocab_start, weight.shape[0], group is not None)
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            logits = (hidden[start:end] @ weight.t()).to(compute)  # (C, V_local)
            picked = logits.gather(1, local_targets[start:end, None]).squeeze(1)  # before the in-place exp
            target_logit[start:end] = torch.where(mine[start:end], picked, 0.0)
            lse[start:end] = _exp_shifted_(logits, group)[0]
        if group is not None:
            dist.all_reduce(target_logit, group=group)  # each target logit comes from its owner
        ctx.save_for_backward(hidden, weight, local_targets, mine, valid, lse)
        ctx.chunk_size, ctx.group = chunk_size, group
        return (lse - target_logit) * valid

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, local_targets, mine, valid, lse = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        grad_scale = (grad_losses * valid).to(lse.dtype)  # (T,)
        target_scale = grad_scale * mine  # the one-hot term, only where this shard owns the target
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # Accumulate the weight gradient in fp32 across chunks: summing many bf16 partial
        # products would lose the small ones.
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device)
            if ctx.needs_input_grad[1]
            else None
        )
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            h = hidden[start:end]
            rows = torch.arange(end - start, device=h.device)
            # d CE / d logits = softmax - one_hot(target), times the upstream gradient; in place.
            dlogits = (h @ weight.t()).to(lse.dtype).sub_(lse[start:end, None]).exp_().mul_(grad_scale[start:end, None])
            dlogits[rows, local_targets[start:end]] -= target_scale[start:end]
            dlogits = dlogits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = dlogits @ weight
            if grad_weight is not None:
                grad_weight += (dlogits.t() @ h).to(grad_weight.dtype)
        if grad_hidden is not None and ctx.group is not None:
            # The hidden state is replicated over the group; its gradient sums every vocab shard.
            dist.all_reduce(grad_hidden, group=ctx.group)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 4096,
    ignore_index: int = IGNORE_INDEX,
    *,
    vocab_start: int = 0,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """hidden (T, H), weight (V, H), targets (T,) -> per-token CE (T,) in fp32 (0 where ignored).

    With `group`, hidden is replicated over the group and `weight` holds this rank's vocabulary
    rows [vocab_start, vocab_start + weight.shape[0]); every rank gets the full per-token CE."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"expected hidden (T, H) and targets (T,), got {tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    if torch.is_autocast_enabled(hidden.device.type):
        # Under autocast, run the matmuls in the autocast dtype explicitly: autocast does not
        # reach inside autograd.Function.backward, and both passes must agree.
        dtype = torch.get_autocast_dtype(hidden.device.type)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return _ChunkedLinearCrossEntropy.apply(
                hidden.to(dtype), weight.to(dtype), targets, chunk_size, ignore_index, vocab_start, group
            )
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index, vocab_start, group)
