"""Run a function in N gloo processes on one machine: the distributed tests' launcher."""

from __future__ import annotations

import io
import os
import traceback
from collections.abc import Callable

import torch
import torch.multiprocessing as mp

from ouro_train.parallel.groups import host_store


def _entry(fn: Callable, rank: int, world_size: int, port: int, args: tuple, queue) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        # Every rank is a client of the store this launcher serves (torchrun's agent store does
        # the same), instead of rank 0 binding MASTER_PORT itself.
        TORCHELASTIC_USE_AGENT_STORE="True",
        DS_ACCELERATOR="cpu",
    )
    try:
        # As bytes: tensors sent through a torch queue are shared by file descriptor, which
        # breaks once this process exits.
        buffer = io.BytesIO()
        torch.save(fn(*args), buffer)
        queue.put((rank, True, buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - report any failure to the parent, with its traceback
        queue.put((rank, False, traceback.format_exc()))


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 300.0) -> list:
    """fn(*args) on `world_size` spawned processes (env as torchrun sets it); returns the results
    by rank, or raises with the traceback of the first rank that failed."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store = host_store(world_size)  # served as long as this function runs
    procs = [
        ctx.Process(target=_entry, args=(fn, rank, world_size, store.port, args, queue)) for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, object] = {}
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return [results[rank] for rank in range(world_size)]
