"""Parallelism applied from outside the plain model, in this order:

0. (before: materialize.build_model) this rank's model: the plain one, or on the meta device for
   tensor parallel (filled in step 1), or partitioned under ZeRO-3's zero.Init, so that no rank
   holds the full model unless its layout needs it;
1. tensor parallel: swap linears / embedding / head for megatron-core parallel layers. First,
   because it changes which parameters exist (shards) and every later stage wraps those;
1b. LoopLM-aware mixed precision (`train.precision=bf16_loop` or `fp8`, parallel/precision.py): the
   shared linears' bf16 (and float8) copies and fp32 gradient accumulators, before the wrappers
   that call them;
2. activation checkpointing: wraps module forwards, so it must see the final modules, and it
   must come before DeepSpeed, whose ZeRO-3 hooks attach to those modules;
3. torch.compile of each decoder layer (`parallel.compile`): after checkpointing, whose wrapper it
   traces, and before DeepSpeed, which hands the compiled modules to its engine;
3b. ZeRO-3 with `parallel.zero3_gather=trunk` (parallel/zero3.py): the layers become one DeepSpeed
   leaf module called once around all R recurrent steps, before DeepSpeed registers its hooks;
4. DeepSpeed `initialize`: owns the optimizer, ZeRO partitioning over the data-parallel group
   (megatron's groups handed over as `mpu`), gradient accumulation and clipping.
"""

from __future__ import annotations

from ouro_train.config.resolve import Resolved
from ouro_train.config.schema import LOOP_PRECISIONS, Config
from ouro_train.model.looplm import LoopLM
from ouro_train.parallel.checkpointing import apply_activation_checkpointing, apply_compile
from ouro_train.parallel.groups import MegatronMPU, ParallelLayout, destroy_parallel, init_parallel
from ouro_train.parallel.materialize import WeightSource, build_model
from ouro_train.parallel.precision import apply_loop_precision, check_fp8_device


def parallelize(
    model: LoopLM, cfg: Config, layout: ParallelLayout, resolved: Resolved, weights: WeightSource | None = None
):
    """-> an engine for the trainer: DeepSpeed when distributed or ZeRO is asked for, else None
    (the trainer's single-process engine). `resolved`: what start-up derived (config/resolve.py).
    `weights`: what build_model returned with a model on the
    meta device, the source its tensor-parallel shards are filled from."""
    # megatron-core and DeepSpeed are imported where used: `ouro_train.parallel.checkpointing` (the
    # benchmarks, a single-GPU check) must import without them.
    if layout.tp > 1:
        from ouro_train.parallel.tensor_parallel import apply_tensor_parallel

        model = apply_tensor_parallel(model, sequence_parallel=cfg.parallel.sequence_parallel, weights=weights)
    if cfg.train.precision in LOOP_PRECISIONS:
        if cfg.train.precision == "fp8":
            check_fp8_device(cfg.train.device)
        model = apply_loop_precision(model, fp8=cfg.train.precision == "fp8")
    model = apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing)
    if cfg.parallel.compile:
        model = apply_compile(model)
    if not layout.distributed:
        return None
    if cfg.parallel.zero_stage > 0:
        from ouro_train.checkpoint.optimizer_state import check_deepspeed_version

        check_deepspeed_version()  # ZeRO's optimizer hand-off uses DeepSpeed internals of one version
    if cfg.parallel.zero_stage == 3 and cfg.parallel.zero3_gather == "trunk":
        from ouro_train.parallel.zero3 import gather_layers_once

        model = gather_layers_once(model)
    from ouro_train.parallel.engine import DeepSpeedEngine

    return DeepSpeedEngine(model.to(cfg.train.device), cfg, resolved, MegatronMPU())


__all__ = ["ParallelLayout", "build_model", "destroy_parallel", "init_parallel", "parallelize"]
