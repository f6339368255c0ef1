"""Chunked cross-entropy with the vocabulary split over the tensor-parallel group.

Each rank holds rows [start, start + V/tp) of the LM head. Per chunk of tokens a rank computes
its slice of the logits; the log-sum-exp and the target logit are completed with three
all-reduces over (chunk,) vectors, never over logits. Backward recomputes the local logits;
d hidden needs the sum over every vocabulary shard, so it is all-reduced. As in the
single-device version, at most `chunk x V/tp` logits exist at once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ouro_train.kernels.linear_cross_entropy import IGNORE_INDEX, _softmax_dtype


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, vocab_start, group, ignore_index):
        compute = _softmax_dtype(hidden)
        vocab_local = weight.shape[0]
        num_tokens = hidden.shape[0]
        lse = torch.empty(num_tokens, dtype=compute, device=hidden.device)
        target_logit = torch.zeros(num_tokens, dtype=compute, device=hidden.device)
        valid = targets != ignore_index
        local_target = targets - vocab_start
        mine = valid & (local_target >= 0) & (local_target < vocab_local)  # target in this shard
        local_target = torch.where(mine, local_target, 0)
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            logits = (hidden[start:end] @ weight.t()).to(compute)  # (C, V/tp)
            row_max = logits.max(dim=-1).values
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
            sum_exp = (logits - row_max[:, None]).exp().sum(-1)
            dist.all_reduce(sum_exp, group=group)
            lse[start:end] = row_max + sum_exp.log()
            picked = logits.gather(1, local_target[start:end, None]).squeeze(1)
            target_logit[start:end] = torch.where(mine[start:end], picked, 0.0)
        dist.all_reduce(target_logit, group=group)
        ctx.save_for_backward(hidden, weight, local_target, mine, valid, lse)
        ctx.chunk_size, ctx.group = chunk_size, group
        return (lse - target_logit) * valid

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, local_target, mine, valid, lse = ctx.saved_tensors
        scale_all = (grad_losses * valid).to(lse.dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(
            weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device
        )
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            h = hidden[start:end]
            scale = scale_all[start:end, None]
            dlogits = (h @ weight.t()).to(lse.dtype).sub_(lse[start:end, None]).exp_().mul_(scale)
            rows = torch.nonzero(mine[start:end]).squeeze(1)
            dlogits[rows, local_target[start:end][rows]] -= scale.squeeze(1)[rows]
            dlogits = dlogits.to(hidden.dtype)
            grad_hidden[start:end] = dlogits @ weight
            grad_weight += (dlogits.t() @ h).to(grad_weight.dtype)
        # The hidden state is replicated over the group; its gradient sums every vocab shard.
        dist.all_reduce(grad_hidden, group=ctx.group)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None


def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int,
    group,
    chunk_size: int = 4096,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """hidden (T, H) replicated over `group`, weight_shard (V/tp, H) -> per-token CE (T,)."""
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return _VocabParallelLinearCrossEntropy.apply(
                hidden.to(dtype), weight_shard.to(dtype), targets, chunk_size, vocab_start, group, ignore_index
            )
    return _VocabParallelLinearCrossEntropy.apply(
        hidden, weight_shard, targets, chunk_size, vocab_start, group, ignore_index
    )
