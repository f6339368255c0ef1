"""Resuming a DeepSpeed ZeRO checkpoint at another layout, through DeepSpeed's universal checkpoint.

ZeRO 1/2/3 shard the optimizer over the data-parallel ranks that saved it, and DeepSpeed
refuses those shards at another data-parallel size. `ds_to_universal` rewrites them as one
file per parameter and optimizer state (full tensors), which an engine of any data-parallel
size loads with `load_universal`, at ZeRO 1 or 2 from ZeRO 1/2 shards, at ZeRO 3 from ZeRO 3.
The conversion runs once, on rank 0, into `<checkpoint>/universal` (a cache, committed by
rename like the checkpoint itself), so a second resume at a new size does not convert again.
A new tensor-parallel size is refused by the manager: ds_to_universal (deepspeed 0.19.8) fails
merging these layers' slices. The merge patterns are saved anyway, for a fixed converter.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch.distributed as dist

from ouro_train.checkpoint.store import CheckpointError

UNIVERSAL_DIR = "universal"
TAG = "state"


def universal_checkpoint_info(vocab_size: int) -> dict:
    """How `ds_to_universal` merges tensor-parallel slices of this model (megatron-core layers with
    the reference key names): column-parallel linears are cut along dim 0 (the default), row-parallel
    ones along dim 1, the embedding and head along the vocabulary; norms and the exit gate are
    replicated on every tensor-parallel rank."""
    return {
        "universal_checkpoint_version": 0.2,
        "tp_replicated_parameter_patterns": [r".*norm.*\.weight$", r".*early_exit_gate\..*"],
        "parameter_with_row_parallelism_patterns": [r".*self_attn\.o_proj\.weight$", r".*mlp\.down_proj\.weight$"],
        "vocabulary_parameter_patterns": [r".*embed_tokens\.weight$", r"^lm_head\.weight$"],
        # The vocabulary is never padded here: tensor_parallel must divide it (ParallelConfig.check_world).
        "original_vocab_size": vocab_size,
        "padded_vocab_size": vocab_size,
    }


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def ensure_universal(checkpoint: Path, rank: int) -> Path:
    """-> the directory to `load_checkpoint(..., tag='state')` with load_universal; converts once.

    Collective: every rank calls it; rank 0 converts while the others wait at a barrier.
    """
    target = checkpoint / UNIVERSAL_DIR
    error = ""
    if rank == 0 and not (target / TAG / "zero").is_dir():
        source = checkpoint / "engine" / TAG
        if not any(source.glob("*optim_states.pt")):
            error = (
                f"{source}: no ZeRO optimizer shards (*optim_states.pt); only ZeRO 1/2/3 checkpoints convert "
                "to another layout: relaunch with the layout that saved it, or start from its weights with "
                f"checkpoint.init_from={checkpoint}"
            )
        else:
            tmp = checkpoint / f".{UNIVERSAL_DIR}-tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            started = time.monotonic()
            try:
                _convert(source, tmp / TAG)
                if target.exists():  # a cache without its zero/ folder: not usable, replace it
                    shutil.rmtree(target)
                os.replace(tmp, target)
                print(f"converted {source} to a universal checkpoint in {time.monotonic() - started:.1f} s: {target}")
            except Exception as exc:  # noqa: BLE001 - reported on every rank below
                shutil.rmtree(tmp, ignore_errors=True)
                error = f"{checkpoint}: converting to DeepSpeed's universal checkpoint failed: {exc}"
    if dist.is_available() and dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise CheckpointError(error)
    return target


def _convert(source: Path, output: Path) -> None:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    workers = max(1, min(8, (os.cpu_count() or 1) // 2))
    ds_to_universal(
        argparse.Namespace(
            input_folder=str(source),
            output_folder=str(output),
            num_extract_workers=workers,
            num_merge_workers=workers,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=False,
        )
    )
