"""Tensor parallelism: swap the plain LoopLM's linears and embedding for megatron-core's
column / row / vocab-parallel layers, each loaded with its shard of the existing weights (so a
TP run starts from exactly the single-device model).

    attention: q, k, v  column-parallel (heads split)      o_proj    row-parallel
    MLP:       gate, up column-parallel (intermediate split) down_proj row-parallel
    embedding: vocab-parallel                               lm_head   vocab-split, CE in shards
    norms, exit gate: replicated (identical inputs and gradients on every TP rank)

The subclasses return a tensor (megatron's layers return (output, bias)) and keep the
reference attribute names, so `model.layers.0.self_attn.q_proj.weight` still names the
(sharded) weight.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    set_tensor_model_parallel_attributes,
)
from torch import nn

from ouro_train.kernels.linear_cross_entropy import linear_cross_entropy
from ouro_train.model.looplm import LoopLM


def _no_init(weight: torch.Tensor) -> None:
    """Weights are copied from the single-device model, not initialised."""


class ColumnParallel(ColumnParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class RowParallel(RowParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class VocabParallelHead(ColumnParallelLinear):
    """LM head holding rows [vocab_start, vocab_start + V/tp), with LMHead's interface:
    `head(h)` gives full logits (inference, tests; gathered here since megatron's own gather
    assumes CUDA), `head(h, targets)` the per-token CE computed on the shard, and
    `head(states, targets, exit_weights=p)` the all-steps stage I term with CE (R, n)."""

    def forward(
        self,
        x: torch.Tensor | list[torch.Tensor],
        targets: torch.Tensor | None = None,
        chunk_size: int = 4096,
        exit_weights: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        group = parallel_state.get_tensor_model_parallel_group()
        if targets is not None:
            shard = dict(
                vocab_start=parallel_state.get_tensor_model_parallel_rank() * self.weight.shape[0], group=group
            )
            if exit_weights is not None:
                from ouro_train.kernels.exit_weighted_cross_entropy import exit_weighted_cross_entropy

                return exit_weighted_cross_entropy(x, self.weight, targets, exit_weights, chunk_size, **shard)
            return linear_cross_entropy(x, self.weight, targets, chunk_size, **shard)
        from torch.distributed.nn.functional import all_gather

        local = super().forward(x)[0]  # (..., V/tp)
        return torch.cat(all_gather(local.contiguous(), group=group), -1)


def _megatron_config(tp: int, device: torch.device, sequence_parallel: bool) -> ModelParallelConfig:
    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=device.type == "cpu",
        perform_initialization=False,
        params_dtype=torch.float32,
        gradient_accumulation_fusion=False,
    )


def _load_shard(param: torch.nn.Parameter, full: torch.Tensor, dim: int, rank: int, tp: int) -> None:
    """Copy this rank's slice of `full` and mark the parameter as sharded along `dim`. Megatron
    sets the mark only when it initialises weights itself; DeepSpeed's gradient norm and
    clipping read it to count each shard once (and replicated parameters once per group)."""
    size = full.shape[dim] // tp
    with torch.no_grad():
        param.copy_(full.narrow(dim, rank * size, size))
    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)


def _column(linear: nn.Linear, config: ModelParallelConfig, rank: int, tp: int, cls=ColumnParallel) -> nn.Module:
    layer = cls(
        linear.in_features, linear.out_features, config=config, init_method=_no_init, bias=False, gather_output=False
    )
    _load_shard(layer.weight, linear.weight, 0, rank, tp)
    return layer


def _row(linear: nn.Linear, config: ModelParallelConfig, rank: int, tp: int) -> nn.Module:
    layer = RowParallel(
        linear.in_features,
        linear.out_features,
        config=config,
        init_method=_no_init,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=True,
    )
    _load_shard(layer.weight, linear.weight, 1, rank, tp)
    return layer


def apply_tensor_parallel(model: LoopLM, sequence_parallel: bool = False) -> LoopLM:
    """In place: every rank of the TP group must hold the same full weights when this runs."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return model
    rank = parallel_state.get_tensor_model_parallel_rank()
    device = model.lm_head.weight.device
    # Megatron's layers run without their own sequence parallelism (its collectives need CUDA and
    # the [S, B, H] layout); ouro_train.parallel.sequence_parallel wraps them instead.
    config = _megatron_config(tp, device, sequence_parallel=False)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj, attn.k_proj, attn.v_proj = (
            _column(p, config, rank, tp) for p in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        attn.o_proj = _row(attn.o_proj, config, rank, tp)
        mlp.gate_proj, mlp.up_proj = _column(mlp.gate_proj, config, rank, tp), _column(mlp.up_proj, config, rank, tp)
        mlp.down_proj = _row(mlp.down_proj, config, rank, tp)
    embedding = model.model.embed_tokens
    parallel_embedding = VocabParallelEmbedding(
        embedding.num_embeddings, embedding.embedding_dim, init_method=_no_init, config=config
    )
    _load_shard(parallel_embedding.weight, embedding.weight, 0, rank, tp)
    model.model.embed_tokens = parallel_embedding
    model.lm_head = _column(model.lm_head, config, rank, tp, cls=VocabParallelHead)
    if sequence_parallel:
        from ouro_train.parallel.sequence_parallel import apply_sequence_parallel

        apply_sequence_parallel(model)
    return model.to(device)
