"""Start-up without the full model on every rank: build this rank's LoopLM and fill only its share.

    no TP, ZeRO 0-2   every rank holds the full parameters anyway: the plain build
                      (init_from read lazily, one tensor at a time, into it)
    tensor parallel   LoopLM on the meta device (no memory); parallelize's tensor-parallel step
                      creates megatron-core's layers and fills each shard from a weight source,
                      which computes (or reads) one full parameter at a time and keeps the slice;
                      replicated parameters (norms, exit gate) are created and filled the same way.
                      With ZeRO-3 on top DeepSpeed then partitions the shards over data parallel
    ZeRO-3, no TP     built under deepspeed.zero.Init (each module's parameters partitioned over
                      the data-parallel group as soon as it exists), then each parameter gathered
                      alone, set on data-parallel rank 0 and partitioned again

Every build computes initial values with model/init.py's `initial_value` from the same model seed
(drawn after `torch.manual_seed(train.seed)`), so at any layout the consolidated weights are bit
for bit those of `torch.manual_seed(seed); LoopLM(cfg)` on one process.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ouro_train.checkpoint.weights import SafetensorsWeights, parameter_shapes
from ouro_train.config.resolve import Resolved
from ouro_train.config.schema import Config
from ouro_train.model.init import initial_value
from ouro_train.model.looplm import LoopLM
from ouro_train.parallel.groups import ParallelLayout


class WeightSource(Protocol):
    def get(self, name: str, dim: int | None = None, rank: int = 0, parts: int = 1) -> torch.Tensor:
        """fp32 CPU: the full tensor of parameter `name`, or the `rank`-th of `parts` equal slices along `dim`."""
        ...


class InitialWeights:
    """The initial weights of a LoopLM (meta, partitioned or plain), computed one parameter at a time."""

    def __init__(self, model: LoopLM) -> None:
        self.seed = model.init_seed
        self.rules = model.init_rules()
        self.shapes = parameter_shapes(model)

    def get(self, name: str, dim: int | None = None, rank: int = 0, parts: int = 1) -> torch.Tensor:
        full = initial_value(name, self.shapes[name], self.rules[name], self.seed)
        if dim is None:
            return full
        size = full.shape[dim] // parts
        return full.narrow(dim, rank * size, size).clone()  # a copy, so the full tensor is freed


class ModuleWeights:
    """The current full weights of a plain model (tensor-parallel conversion of a built model). Looked
    up by name at each call: the conversion reads a linear's weight before replacing the linear, so
    each full weight is freed as soon as its shard exists."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def get(self, name: str, dim: int | None = None, rank: int = 0, parts: int = 1) -> torch.Tensor:
        full = self.model.get_parameter(name).detach()
        if dim is None:
            return full
        size = full.shape[dim] // parts
        return full.narrow(dim, rank * size, size)


def weight_source(model: LoopLM, init_from: Path | None) -> WeightSource:
    """Where `model`'s starting weights come from: a previous stage's consolidated weights
    (checked against the model's names and shapes here), or the initial values."""
    if init_from is None:
        return InitialWeights(model)
    return SafetensorsWeights(init_from, parameter_shapes(model))


def build_model(
    cfg: Config, layout: ParallelLayout, resolved: Resolved, init_from: Path | None = None
) -> tuple[LoopLM, WeightSource | None]:
    """-> (this rank's model, the source parallelize's tensor-parallel step fills it from, or None when
    the model is already complete: no tensor parallel). `init_from`: a checkpoint's weights instead of
    the initial ones."""
    torch.manual_seed(cfg.train.seed)  # the same model seed on every rank
    if layout.tp > 1:
        with torch.device("meta"):
            model = LoopLM(cfg.model)
        return model, weight_source(model, init_from)
    if cfg.parallel.zero_stage == 3 and layout.distributed:
        with zero3_init(cfg, layout, resolved):
            model = LoopLM(cfg.model)
        wrong = sorted({str(p.ds_tensor.dtype) for p in model.parameters()} - {"torch.float32"})
        if wrong:
            raise RuntimeError(f"zero.Init built {wrong} parameters; training keeps fp32 parameters")
        release_freed_memory()
        fill_partitioned(model, weight_source(model, init_from), layout.dp_rank)
        release_freed_memory()
        return model, None
    model = LoopLM(cfg.model)
    if init_from is not None:
        fill(model, weight_source(model, init_from))
    return model, None


def zero3_init(cfg: Config, layout: ParallelLayout, resolved: Resolved):
    """deepspeed.zero.Init over megatron's data-parallel group with the engine's own config (so
    deepspeed.initialize finds the parameters partitioned as it would have partitioned them)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from ouro_train.parallel.engine import deepspeed_config
    from ouro_train.parallel.groups import MegatronMPU

    # As deepspeed.initialize does first: DeepSpeed's comm wraps our process group. Before it, the
    # config below would count a data-parallel world of 1 (and reject the batch size).
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    mpu = MegatronMPU()
    return deepspeed.zero.Init(
        data_parallel_group=mpu.get_data_parallel_group(),
        # The dtype comes from the config (bf16 off: fp32 parameters). Not `dtype=torch.float32`:
        # deepspeed 0.19.8 ignores an explicit dtype where the accelerator lacks fp16 (an operator
        # precedence slip in InsertPostInitMethodToModuleSubClasses._set_dtype) and builds bf16 on CPU.
        config_dict_or_path=deepspeed_config(cfg, resolved),
        mpu=mpu,
    )


@torch.no_grad()
def fill(model: nn.Module, source: WeightSource) -> None:
    """A plain model's parameters, one at a time."""
    for name, param in model.named_parameters():
        param.copy_(source.get(name))


@torch.no_grad()
def fill_partitioned(model: nn.Module, source: WeightSource, dp_rank: int) -> None:
    """ZeRO-3 partitions, one parameter at a time: gathered (one full parameter on each rank), set on
    data-parallel rank 0 only (the only rank that computes or reads it), broadcast and partitioned
    again as the context exits. Collectives: every rank visits the parameters in the same order."""
    import deepspeed

    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if dp_rank == 0:
                param.data.copy_(source.get(name))


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim; nothing elsewhere). zero.Init
    allocates each module's full parameters and frees them once partitioned; the holes stay
    resident otherwise (ouro_1p4b on 2 ranks: ~1 GB per rank, benchmarks/bench_startup.py)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@torch.no_grad()
def materialize_parameter(module: nn.Module, attribute: str, value: torch.Tensor, device: torch.device) -> None:
    """Replace a meta parameter of `module` by a real one holding `value` (its requires_grad kept)."""
    old = getattr(module, attribute)
    setattr(module, attribute, nn.Parameter(value.to(device, torch.float32), requires_grad=old.requires_grad))
