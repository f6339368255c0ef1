"""Kernels behind a backend named in config (`model.kernels: torch | triton`), each op in its own
file with its plain torch reference beside the Triton kernel: rms_norm.py, swiglu.py, rope.py.

The backend is never chosen by sniffing hardware: `triton` on a device it cannot run on is an
error naming the fix. Triton runs on CUDA tensors, and on CPU tensors only under Triton's
interpreter (`TRITON_INTERPRET=1`, slow, for tests).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

KERNEL_BACKENDS = ("torch", "triton")


def check_backend(backend: str) -> None:
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel backend {backend!r} is unknown; choose one of {list(KERNEL_BACKENDS)}")


def triton_interpreting() -> bool:
    """Whether `triton.jit` would build an interpreted kernel now: the very knob it reads (the
    TRITON_INTERPRET variable, read afresh on every access, unless set in code)."""
    try:
        from triton import knobs
    except ImportError:
        return False
    return bool(knobs.runtime.interpret)


def require_triton(device: torch.device) -> None:
    """Raise a RuntimeError saying what to change when the triton backend cannot run on `device`."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        raise RuntimeError(
            "model.kernels=triton needs the `triton` package, which failed to import "
            f"({error}); install triton or set model.kernels=torch"
        ) from error
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
        return
    raise RuntimeError(
        f"model.kernels=triton: Triton kernels need a CUDA device, got a tensor on {device.type!r}; "
        "set model.kernels=torch (on CPU, only tests run them, under TRITON_INTERPRET=1)"
    )


class TritonKernel:
    """A Triton kernel decorated with `triton.jit` on first launch, not at import.

    Why: triton 3.9 reads TRITON_INTERPRET when `@triton.jit` decorates a function (it returns an
    InterpretedFunction or a compiled JITFunction then; see triton/runtime/jit.py `jit`), not at
    launch. A module-level `@triton.jit` would fix the choice at whatever moment this module was
    first imported, so a test setting the variable later would launch a GPU kernel on CPU tensors.
    Decorating per value of the variable makes the import order irrelevant. The kernel bodies must
    not call other jitted helpers (those would be decorated at import)."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)

    @functools.cache  # noqa: B019 (a handful of module-level kernels, alive for the process anyway)
    def _jitted(self, interpret: bool):
        import triton

        return triton.jit(self.fn)

    def __getitem__(self, grid):
        return self._jitted(triton_interpreting())[grid]


def triton_kernel(fn: Callable) -> TritonKernel:
    return TritonKernel(fn)
