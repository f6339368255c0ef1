"""Counting the host reads of device tensors, each with the line that made it: a diagnostic for the
training step (tests/unit/test_host_syncs.py, tests/distributed/test_parallel.py,
benchmarks/bench_host_reads.py).

On a GPU each read of a device tensor on the host (`.item()`, `.tolist()`, `float()`, `int()`,
`bool()`, `.cpu()`...) waits for every kernel queued before it: the GPU idles while the host then
prepares the next launches. A CPU has nothing to wait for, so the tests count the reads instead,
by wrapping torch.Tensor's reading methods, each with the module and line that called it. On a
GPU, `torch.cuda.set_sync_debug_mode("warn")` shows the synchronisations themselves. Not for
production use: the wrappers are Python calls on every read."""

from __future__ import annotations

import contextlib
import sys

import torch

# Every way to turn a tensor into host values.
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu")


@contextlib.contextmanager
def counting_host_reads():
    """Yields a list that gets (method, "module:line" of the caller) for each tensor read on the host."""
    reads: list[tuple[str, str]] = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name, real):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1)
            reads.append((name, f"{caller.f_globals.get('__name__')}:{caller.f_lineno}"))
            return real(self, *args, **kwargs)

        return wrapper

    try:
        for name, real in originals.items():
            setattr(torch.Tensor, name, wrap(name, real))
        yield reads
    finally:
        for name, real in originals.items():
            setattr(torch.Tensor, name, real)


def cuda_synchronisations(fn) -> list[str]:
    """Runs fn() under CUDA's sync debug mode; -> "file:line" of each synchronisation it made
    (reads of device tensors and synchronising ops alike)."""
    import warnings

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
