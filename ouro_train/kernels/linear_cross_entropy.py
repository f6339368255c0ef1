"""Linear + cross-entropy without materialising the logits of all tokens.

A LoopLM reads logits after every recurrent step: 4 steps x 49,152 vocab x 64K tokens would be
50 GB in fp32. `linear_cross_entropy` computes per-token CE chunk by chunk (at most
`chunk_size x vocab` logits alive at once) and recomputes each chunk's logits in backward
instead of saving them. It returns per-token losses so that the objective can weight them by
the exit probabilities p(t) (and differentiate through those weights).

Cost: one extra (tokens x hidden x vocab) matmul per call versus the naive loss (the forward
logits are recomputed in backward); memory: O(chunk x vocab) instead of O(tokens x vocab).
`linear_cross_entropy_reference` is the plain torch version the tests compare against.
"""

from __future__ import annotations

import torch
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


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, ignore_index: int):
        num_tokens = hidden.shape[0]
        compute = _softmax_dtype(hidden)
        losses = torch.empty(num_tokens, dtype=compute, device=hidden.device)
        # Per-token log-sum-exp, kept for backward: softmax there is exp(logits - lse), one pass.
        lse = torch.empty(num_tokens, dtype=compute, device=hidden.device)
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            logits = (hidden[start:end] @ weight.t()).to(compute)  # (C, V)
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            losses[start:end] = lse[start:end] - logits.gather(1, safe_targets[start:end, None]).squeeze(1)
        losses = losses * valid
        ctx.save_for_backward(hidden, weight, safe_targets, valid, lse)
        ctx.chunk_size = chunk_size
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, targets, valid, lse = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        grad_scale = (grad_losses * valid).to(lse.dtype)  # (T,)
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
            scale = grad_scale[start:end, None]
            # d CE / d logits = softmax - one_hot(target), times the upstream gradient; in place.
            dlogits = (h @ weight.t()).to(lse.dtype).sub_(lse[start:end, None]).exp_().mul_(scale)
            dlogits[rows, targets[start:end]] -= scale.squeeze(1)
            dlogits = dlogits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = dlogits @ weight
            if grad_weight is not None:
                grad_weight += (dlogits.t() @ h).to(grad_weight.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 4096,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """hidden (T, H), weight (V, H), targets (T,) -> per-token CE (T,) in fp32 (0 where ignored)."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"expected hidden (T, H) and targets (T,), got {tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    if torch.is_autocast_enabled(hidden.device.type):
        # Under autocast, run the matmuls in the autocast dtype explicitly: autocast does not
        # reach inside autograd.Function.backward, and both passes must agree.
        dtype = torch.get_autocast_dtype(hidden.device.type)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return _ChunkedLinearCrossEntropy.apply(
                hidden.to(dtype), weight.to(dtype), targets, chunk_size, ignore_index
            )
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index)
