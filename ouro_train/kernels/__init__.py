"""Kernels behind a backend named in config (`model.kernels: torch | triton`), each op in its own
file with its plain torch reference beside the Triton kernel: rms_norm.py, swiglu.py, rope.py.

The backend is never chosen by sniffing hardware: `triton` on a device it cannot run on is an
error naming the fix. Triton runs on CUDA tensors, and on CPU tensors only under Triton's
interpreter (`TRITON_INTERPRET=1`, slow, for tests).
"""

from __future__ import annotations

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


def triton_jit(fn: Callable) -> Callable:
    """`triton.jit(fn)`, or `fn` itself when triton is not installed (then `require_triton` stops
    every launch first, with the message saying so).

    Triton 3.9 reads TRITON_INTERPRET when `@triton.jit` decorates a function, not at launch
    (triton/runtime/jit.py `jit` returns an InterpretedFunction or a JITFunction then), and its
    own helpers (`tl.sum`, `tl.sigmoid`, ...) are decorated when `triton.language` is first
    imported. So the variable must be set before triton's first import: a process that wants the
    interpreter sets it at start (tests/conftest.py does, on machines without CUDA)."""
    try:
        import triton
    except ImportError:
        return fn
    return triton.jit(fn)
