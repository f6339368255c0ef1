"""Process groups: torch.distributed from the launcher's environment, megatron-core's
tensor- and data-parallel groups on top, and the adapter DeepSpeed needs to use them."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ouro_train.config.schema import ModelConfig, ParallelConfig


@dataclass
class ParallelLayout:
    world_size: int
    rank: int
    local_rank: int
    tp: int
    dp: int
    tp_rank: int
    dp_rank: int

    @property
    def distributed(self) -> bool:
        """A process group exists (several processes, or ZeRO on one)."""
        return dist.is_available() and dist.is_initialized()

    def describe(self) -> str:
        return f"world {self.world_size} = tensor parallel {self.tp} x data parallel {self.dp}"


def host_store(world_size: int) -> dist.TCPStore:
    """A rendezvous store served on a port the kernel picks as it binds (port 0), as torchrun's
    agent does. Picking a free port first and binding it later races: between the two, a
    concurrent launch (another pytest-xdist worker, another run on the host) can take it."""
    return dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)


def launcher_world() -> tuple[int, int, int]:
    """(world size, rank, local rank) from torchrun / SLURM-srun-launched torchrun variables."""
    return int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))


def init_parallel(cfg: ParallelConfig, model: ModelConfig, device: str, group: bool = False) -> ParallelLayout:
    """Start torch.distributed (if launched with several processes) and megatron-core's groups.

    `group`: start a (size-1) process group even on one process without ZeRO, so DeepSpeed runs
    the model (to resume a checkpoint DeepSpeed wrote). The checks run before any collective so
    a bad layout fails on every rank with the same message instead of hanging in a collective.
    """
    world, rank, local_rank = launcher_world()
    dp = cfg.check_world(world, model)
    if world == 1 and cfg.zero_stage == 0 and not group:
        return ParallelLayout(1, 0, 0, 1, 1, 0, 0)
    # ZeRO on one process still needs a (size-1) process group: DeepSpeed communicates through it.
    for key, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local_rank)):
        os.environ.setdefault(key, str(value))  # what torchrun sets; DeepSpeed reads LOCAL_RANK
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # Several processes meet at the launcher's MASTER_ADDR:MASTER_PORT (env://); one process
        # meets no one, so it serves its own store wherever the kernel binds it.
        store = None
        if world == 1:
            store = host_store(1)
            os.environ["MASTER_PORT"] = str(store.port)  # DeepSpeed's start-up checks it is set
        timeout = timedelta(minutes=30)
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout, store=store)
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        # gloo twins of the NCCL groups are only useful for CPU-side collectives we do not use.
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tensor_parallel, create_gloo_process_groups=False
        )
    return ParallelLayout(
        world_size=world,
        rank=rank,
        local_rank=local_rank,
        tp=cfg.tensor_parallel,
        dp=dp,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
    )


def destroy_parallel() -> None:
    # Only if megatron was imported (a parallel run): importing it just to find nothing costs seconds.
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class MegatronMPU:
    """DeepSpeed asks its `mpu` for model- and data-parallel groups under names that megatron's
    parallel_state spells differently; this maps them, so ZeRO shards over data parallel only
    and gradient norms count tensor-parallel shards once."""

    def __init__(self) -> None:
        from megatron.core import parallel_state

        self.ps = parallel_state

    def get_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1  # no pipeline parallelism (ARCHITECTURE.md, decision 3)
