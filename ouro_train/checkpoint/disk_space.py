"""Free space for a checkpoint save: how much the next save needs (`estimate_checkpoint_bytes`),
a refusal before anything is written when the file system lacks it (`check_free_space`), and the
message for a write that failed anyway (`write_error`, which names a full disk as such).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import torch

from ouro_train.checkpoint.errors import CheckpointError
from ouro_train.checkpoint.store import complete_checkpoints


def estimate_checkpoint_bytes(root: Path, module: torch.nn.Module, final: bool, tensor_parallel: int = 1) -> int:
    """About how much a new checkpoint takes: the newest complete one's size, or else (the first
    save) 20 bytes per parameter (fp32 weights + engine's fp32 module, master copy and two Adam
    moments), plus 8 per parameter for a final save's layout-free moments."""
    found = complete_checkpoints(root)
    if found:
        return sum(f.stat().st_size for f in found[-1].rglob("*") if f.is_file() and "universal" not in f.parts)
    # ZeRO-3 partitions know their full size; a tensor-parallel shard is one of `tensor_parallel`.
    params = sum(
        p.ds_numel
        if hasattr(p, "ds_numel")
        else p.numel() * (tensor_parallel if getattr(p, "tensor_model_parallel", False) else 1)
        for p in module.parameters()
    )
    return params * (20 + (8 if final else 0))


def check_free_space(root: Path, needed: int, step: int) -> None:
    """A CheckpointError, before anything is written, when `root`'s file system has less than `needed` bytes free."""
    free = shutil.disk_usage(root).free
    if free < needed:
        raise CheckpointError(
            f"{root}: not enough free space to save the checkpoint of step {step}: it needs about "
            f"{needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB are free; free space there or set a run_dir on a "
            "larger file system. Nothing was written; the previous checkpoint is kept"
        )


def write_error(exc: Exception, tmp: Path, step: int) -> str:
    """The message for a failed checkpoint write. torch.save reports a full disk as a RuntimeError
    from its C++ writer ("iostream error", "unexpected pos"), not as ENOSPC: a write that failed
    with (almost) no space left is called a full disk either way."""
    where = getattr(exc, "filename", None) or tmp
    free = shutil.disk_usage(tmp.parent).free if tmp.parent.exists() else 0
    enospc = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if enospc or (isinstance(exc, RuntimeError) and free < 64 * 2**20):
        return (
            f"{where}: the disk filled up while saving the checkpoint of step {step} ({type(exc).__name__}: "
            f"{str(exc).strip()[:200]}; {free / 2**20:.1f} MiB were free); the partial save is removed. Free space "
            "there or set a run_dir on a larger file system. The previous checkpoint is kept"
        )
    return (
        f"{where}: writing the checkpoint of step {step} failed ({type(exc).__name__}: {exc}); the previous "
        "checkpoint is kept"
    )
