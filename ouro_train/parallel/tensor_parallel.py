"""Tensor parallelism: swap the plain LoopLM's linears and embedding for megatron-core's
column / row / vocab-parallel layers, each filled with its shard from a weight source: the
model's own full weights, or (a model built on the meta device, ouro_train.parallel.materialize)
the initial values or a checkpoint's, one full parameter at a time. Either way a TP run starts
from exactly the single-device model.

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
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from torch import nn

from ouro_train.kernels.exit_weighted_cross_entropy import exit_weighted_cross_entropy
from ouro_train.kernels.linear_cross_entropy import linear_cross_entropy
from ouro_train.model.looplm import LoopLM
from ouro_train.parallel.materialize import ModuleWeights, WeightSource, materialize_parameter
from ouro_train.parallel.precision import LOOP_CLASSES, loop_linear


def _no_init(weight: torch.Tensor) -> None:
    """Weights are filled from the weight source, not initialised."""


class ColumnParallel(ColumnParallelLinear):
    """Megatron-core's column-parallel linear (its shard, its initialisation and attributes) with
    megatron's math written so that torch.compile traces it: its copy of the input to the region
    (identity forward, all-reduce of the input gradient in backward), then the GEMM on this rank's
    shard. Megatron's own forward runs an autograd Function whose backward all-reduces
    asynchronously and, like RowParallelLinear's, warns (once, and about the group on global rank 0
    only): torch.compile cannot trace either, so each linear broke the compiled layer's graph (and
    under `layer` checkpointing, which dynamo cannot split, left the layer uncompiled), on rank 0
    more often than on the others (their collectives then came in other orders: a sequence-parallel
    backward deadlocked). Its overlap of that all-reduce with the weight-gradient GEMM is lost."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tensor_model_parallel_region(x, group=self.tp_group), self.weight, self.bias)


class RowParallel(RowParallelLinear):
    """Megatron-core's row-parallel linear, its math written for torch.compile (ColumnParallel):
    the GEMM on this rank's shard of the input features, then the all-reduce of the partial outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_tensor_model_parallel_region(F.linear(x, self.weight), group=self.tp_group)


class LoopColumnParallel(ColumnParallel):
    """A column-parallel shared linear under train.precision=bf16_loop / fp8 (parallel/precision.py
    swaps the class in): in training, megatron's identity-forward / all-reduce-backward copy of the
    input, then the loop-precision GEMM on this rank's weight shard (its bf16 copy, its gradient
    accumulated in fp32). Without grad: ColumnParallel's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        return loop_linear(self, copy_to_tensor_model_parallel_region(x, group=self.tp_group))


class LoopRowParallel(RowParallel):
    """A row-parallel shared linear under bf16_loop / fp8: the loop-precision GEMM on this rank's
    shard of the input features, then megatron's all-reduce of the partial outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        return reduce_from_tensor_model_parallel_region(loop_linear(self, x), group=self.tp_group)


LOOP_CLASSES[ColumnParallel] = LoopColumnParallel
LOOP_CLASSES[RowParallel] = LoopRowParallel


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


def _load_shard(param: torch.nn.Parameter, weights: WeightSource, name: str, dim: int, rank: int, tp: int) -> None:
    """Copy this rank's slice of parameter `name` and mark the parameter as sharded along `dim`.
    Megatron sets the mark only when it initialises weights itself; DeepSpeed's gradient norm and
    clipping read it to count each shard once (and replicated parameters once per group)."""
    with torch.no_grad():
        param.copy_(weights.get(name, dim, rank, tp))
    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)


def _column(
    linear: nn.Linear,
    name: str,
    weights: WeightSource,
    config: ModelParallelConfig,
    rank: int,
    tp: int,
    cls=ColumnParallel,
) -> nn.Module:
    layer = cls(
        linear.in_features, linear.out_features, config=config, init_method=_no_init, bias=False, gather_output=False
    )
    _load_shard(layer.weight, weights, f"{name}.weight", 0, rank, tp)
    layer.weight.requires_grad_(linear.weight.requires_grad)  # freeze_for_objective may have run before
    return layer


def _row(
    linear: nn.Linear, name: str, weights: WeightSource, config: ModelParallelConfig, rank: int, tp: int
) -> nn.Module:
    layer = RowParallel(
        linear.in_features,
        linear.out_features,
        config=config,
        init_method=_no_init,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=True,
    )
    _load_shard(layer.weight, weights, f"{name}.weight", 1, rank, tp)
    layer.weight.requires_grad_(linear.weight.requires_grad)
    return layer


def apply_tensor_parallel(
    model: LoopLM,
    sequence_parallel: bool = False,
    weights: WeightSource | None = None,
    device: torch.device | str | None = None,
) -> LoopLM:
    """In place. `weights`: where the shards come from; None: the model's own full weights (then
    every rank of the TP group must hold the same ones). A model on the meta device (materialize.py
    build_model) needs `weights`; it is built on `device` (default the CPU, as the plain model is;
    DeepSpeed moves it to the training device): only shards and the replicated parameters are ever
    allocated, one full parameter at a time."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return model
    rank = parallel_state.get_tensor_model_parallel_rank()
    on_meta = model.lm_head.weight.is_meta
    if on_meta and weights is None:
        raise ValueError("apply_tensor_parallel: a model on the meta device needs a weight source to fill its shards")
    weights = weights if weights is not None else ModuleWeights(model)
    device = torch.device(device or "cpu") if on_meta else model.lm_head.weight.device
    # Megatron's layers run without their own sequence parallelism (its collectives need CUDA and
    # the [S, B, H] layout); ouro_train.parallel.sequence_parallel wraps them instead.
    config = _megatron_config(tp, device, sequence_parallel=False)
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        prefix = f"model.layers.{i}"
        attn.q_proj, attn.k_proj, attn.v_proj = (
            _column(getattr(attn, p), f"{prefix}.self_attn.{p}", weights, config, rank, tp)
            for p in ("q_proj", "k_proj", "v_proj")
        )
        attn.o_proj = _row(attn.o_proj, f"{prefix}.self_attn.o_proj", weights, config, rank, tp)
        mlp.gate_proj, mlp.up_proj = (
            _column(getattr(mlp, p), f"{prefix}.mlp.{p}", weights, config, rank, tp) for p in ("gate_proj", "up_proj")
        )
        mlp.down_proj = _row(mlp.down_proj, f"{prefix}.mlp.down_proj", weights, config, rank, tp)
    embedding = model.model.embed_tokens
    parallel_embedding = VocabParallelEmbedding(
        embedding.num_embeddings, embedding.embedding_dim, init_method=_no_init, config=config
    )
    _load_shard(parallel_embedding.weight, weights, "model.embed_tokens.weight", 0, rank, tp)
    parallel_embedding.weight.requires_grad_(embedding.weight.requires_grad)
    model.model.embed_tokens = parallel_embedding
    model.lm_head = _column(model.lm_head, "lm_head", weights, config, rank, tp, cls=VocabParallelHead)
    # The rest is replicated (norms, exit gate): created (from the meta device) or set from the source.
    for name, param in list(model.named_parameters()):
        if getattr(param, "tensor_model_parallel", False) or isinstance(weights, ModuleWeights):
            continue
        if param.is_meta:
            owner, _, attribute = name.rpartition(".")
            materialize_parameter(model.get_submodule(owner), attribute, weights.get(name), device)
        else:
            with torch.no_grad():
                param.copy_(weights.get(name))
    if on_meta:
        model.init_buffers(device)  # the derived buffers (RoPE frequencies) hold no values on meta
    if sequence_parallel:
        from ouro_train.parallel.sequence_parallel import apply_sequence_parallel

        apply_sequence_parallel(model)
    return model.to(device)
