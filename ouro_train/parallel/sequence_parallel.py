"""Sequence parallelism inside the tensor-parallel group, for the [B, S, H] layout.

Between the tensor-parallel blocks the residual stream lives on a sequence shard (B, S/tp, H):
the four RMSNorms of each layer, the residual adds and the final norm then hold 1/tp of the
activations. Attention and the MLP gather the sequence on the way in and split it on the way
out; the embedding's (all-reduced) output is split; each step's state is gathered again where
it leaves the loop (`LoopLM.readout`), so the head's vocab-parallel CE and the exit gate see
every token. The RMSNorm weights now see only their shard's tokens, so their gradients are
summed over the group.

Megatron-core's own sequence-parallel collectives allocate on CUDA and cut along dim 0
([S, B, H]); these do the same with torch.distributed on dim 1, on any backend. An all-reduce
followed by a split is a reduce-scatter in effect (same volume on gloo, which lacks
reduce-scatter); the activation memory saved is the point here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ouro_train.model.layers import RMSNorm
from ouro_train.model.looplm import LoopLM


def _local_chunk(x: torch.Tensor, group) -> torch.Tensor:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[1] % size:
        raise ValueError(
            f"sequence parallelism needs the sequence length ({x.shape[1]}) divisible by "
            f"tensor_parallel={size}; change train.seq_len"
        )
    return x.chunk(size, dim=1)[rank].contiguous()


def _all_gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


class _SplitSequence(torch.autograd.Function):
    """Forward: keep this rank's sequence chunk of a replicated tensor. Backward: all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _local_chunk(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_sequence(grad, ctx.group), None


class _GatherSequence(torch.autograd.Function):
    """Forward: all-gather the sequence. Backward: this rank's chunk of the gradient. The
    consumers (column-parallel layers, the vocab-parallel CE, the replicated gate) already make
    that gradient identical on every rank, so no reduction is needed here."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_sequence(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _local_chunk(grad, ctx.group), None


def split_sequence(x: torch.Tensor) -> torch.Tensor:
    return _SplitSequence.apply(x, parallel_state.get_tensor_model_parallel_group())


def gather_sequence(x: torch.Tensor) -> torch.Tensor:
    return _GatherSequence.apply(x, parallel_state.get_tensor_model_parallel_group())


def _gathered_in_split_out(module: torch.nn.Module) -> None:
    forward = module.forward
    # An instance attribute shadows the class's forward; the state-dict keys are unchanged.
    module.forward = lambda x, *args, **kwargs: split_sequence(forward(gather_sequence(x), *args, **kwargs))


def _sum_over_group(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
    return grad


def apply_sequence_parallel(model: LoopLM) -> LoopLM:
    """After apply_tensor_parallel: shard the sequence between the tensor-parallel blocks."""
    for layer in model.model.layers:
        _gathered_in_split_out(layer.self_attn)
        _gathered_in_split_out(layer.mlp)
    embed_forward = model.model.embed_tokens.forward
    model.model.embed_tokens.forward = lambda ids: split_sequence(embed_forward(ids))
    model.readout = gather_sequence
    for module in model.modules():
        if isinstance(module, RMSNorm):
            # Each use sees 1/tp of the tokens: sum the partial gradients over the group (a hook
            # per use of the shared layer is exact: a sum of sums).
            module.weight.register_hook(_sum_over_group)
            module.weight.sequence_parallel = True
    return model
