"""Initial weights that do not depend on the layout: each parameter from its own generator.

A parameter's initial value is a function of (the model seed, its name, its shape) only, not of
the order in which modules are built, the device, or which shard a rank holds. So the
single-device model, a tensor-parallel shard and a ZeRO-3 partition start from the same numbers:
the sharded builds (ouro_train.parallel.materialize) compute the full tensor of one parameter
with `initial_value` and keep their slice, and `LoopLM.reset_parameters` calls the same function.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch

InitKind = Literal["normal", "constant"]
# How one parameter starts: ("normal", std) draws N(0, std); ("constant", c) fills it with c.
Init = tuple[InitKind, float]


def draw_model_seed() -> int:
    """The model seed when none is given: one draw from torch's global CPU generator, so that
    `torch.manual_seed(s); LoopLM(cfg)` is reproducible and differs between seeds. On the CPU
    explicitly: under `with torch.device("meta")` a draw on the default device would be no number."""
    return int(torch.randint(0, 2**62, (), device="cpu"))


def parameter_seed(model_seed: int, name: str) -> int:
    """A stable 64-bit seed for one parameter (not Python's `hash`, which is salted per process)."""
    digest = hashlib.blake2b(f"{model_seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def initial_value(
    name: str,
    shape: torch.Size | tuple[int, ...],
    init: Init,
    model_seed: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The full initial tensor of parameter `name`, on the CPU: ("normal", std) for linears and the
    embedding, ("constant", 0) for biases, ("constant", 1) for norms (LoopLM.init_rules). Drawn in
    fp32 on the CPU generator whatever the target dtype and device (CUDA's generator gives other
    numbers), then cast."""
    kind, value = init
    if kind == "normal":
        generator = torch.Generator(device="cpu").manual_seed(parameter_seed(model_seed, name))
        full = torch.empty(shape, dtype=torch.float32, device="cpu").normal_(0.0, value, generator=generator)
    elif kind == "constant":
        full = torch.full(shape, float(value), dtype=torch.float32, device="cpu")
    else:
        raise ValueError(f"{name}: unknown initialisation {kind!r}; use normal or constant")
    return full.to(dtype)
