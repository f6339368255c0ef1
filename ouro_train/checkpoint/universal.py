"""Resuming a DeepSpeed ZeRO checkpoint at another layout, through DeepSpeed's universal checkpoint.

ZeRO 1/2/3 shard the optimizer over the data-parallel ranks that saved it, and DeepSpeed
refuses those shards at another data-parallel size. `ds_to_universal` rewrites them as one
file per parameter and optimizer state (full tensors), which an engine of any data-parallel
size loads with `load_universal`, at ZeRO 1 or 2 from ZeRO 1/2 shards, at ZeRO 3 from ZeRO 3.
The conversion runs once, on rank 0, into `<checkpoint>/universal` (a cache, committed by
rename like the checkpoint itself), so a second resume at a new size does not convert again.
A new tensor-parallel size is refused by the manager: ds_to_universal (deepspeed 0.19.8) fails
merging these layers' slices (and, measured, so does a same tensor-parallel size > 1 at a new
data-parallel size, which the manager lets through). The merge patterns stay: ds_to_universal
reads them on every conversion (at tensor parallel 1 they change nothing), and checkpoints
written now carry them for a converter that merges megatron-core slices.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from ouro_train.checkpoint.errors import CheckpointError
from ouro_train.utils.atomic import atomic_path, remove_stale_temporaries

UNIVERSAL_DIR = "universal"
TAG = "state"


PATTERNS = {
    "tp_replicated_parameter_patterns": [r".*norm.*\.weight$", r".*early_exit_gate\..*"],
    "parameter_with_row_parallelism_patterns": [r".*self_attn\.o_proj\.weight$", r".*mlp\.down_proj\.weight$"],
    "vocabulary_parameter_patterns": [r".*embed_tokens\.weight$", r"^lm_head\.weight$"],
}


def universal_checkpoint_info(vocab_size: int, trained: list[str] | None = None) -> dict:
    """How `ds_to_universal` merges tensor-parallel slices of this model (megatron-core layers with
    the reference key names): column-parallel linears are cut along dim 0 (the default), row-parallel
    ones along dim 1, the embedding and head along the vocabulary; norms and the exit gate are
    replicated on every tensor-parallel rank.

    `trained`: the names of the parameters the optimizer holds (None: all). ds_to_universal converts
    only those (a frozen parameter has no optimizer state; DeepSpeed keeps it in the model-states
    file) and, run strict, refuses a pattern that matches none of them: stage II (`objective.kind=gate`)
    trains the exit gate alone, so its checkpoints list the gate's pattern only."""
    patterns = PATTERNS
    if trained is not None:
        patterns = {
            key: [p for p in values if any(re.match(p, name) for name in trained)] for key, values in PATTERNS.items()
        }
    return {
        "universal_checkpoint_version": 0.2,
        **patterns,
        # The vocabulary is never padded here: tensor_parallel must divide it (ParallelConfig.check_world).
        "original_vocab_size": vocab_size,
        "padded_vocab_size": vocab_size,
    }


def ensure_universal(checkpoint: Path, rank: int, trust: bool = False) -> Path:
    """-> the directory to `load_checkpoint(..., tag='state')` with load_universal; converts once.

    Collective: every rank calls it; rank 0 converts while the others wait at a barrier.
    `ds_to_universal` unpickles every engine file with weights_only=False; unless `trust`
    (checkpoint.trust_engine_files), the files are first checked (the refused one named) and the
    conversion runs with every torch.load forced to weights-only (safety.restricted_loads).
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
            remove_stale_temporaries(target)  # a conversion that was killed
            started = time.monotonic()
            try:
                # Replaces a cache without its zero/ folder (not usable); a failure removes the temporary.
                with atomic_path(target) as tmp:
                    _convert(source, tmp / TAG, trust=trust)
                print(f"converted {source} to a universal checkpoint in {time.monotonic() - started:.1f} s: {target}")
            except CheckpointError as exc:  # a file refused: its own message names it and the way out
                error = str(exc)
            except Exception as exc:  # noqa: BLE001 - reported on every rank below
                error = f"{checkpoint}: converting to DeepSpeed's universal checkpoint failed: {exc}"
    if dist.is_available() and dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise CheckpointError(error)
    return target


def _convert(source: Path, output: Path, trust: bool = False, workers: int | None = None) -> None:
    """ds_to_universal(source -> output). Unless `trust`: each file is checked first (a refusal names
    it), then the whole conversion runs inside restricted_loads, so every torch.load it does is
    weights-only, in this process and in its extraction/merge workers (`_do_parallel_work`, a
    ProcessPoolExecutor of the default multiprocessing context, created and shut down inside the
    call). Workers forked inside the block inherit the environment switch and the safe globals;
    a spawned or forkserver worker would get neither reliably (a forkserver started earlier keeps
    its old environment), so under another start method the conversion runs in this process."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    from ouro_train.checkpoint.safety import restricted_loads, verify_engine_files

    if workers is None:
        workers = max(1, min(8, (os.cpu_count() or 1) // 2))
    # The start method ProcessPoolExecutor will use (the first listed is the default), without fixing it.
    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    if not trust and method != "fork":
        workers = 1  # _do_parallel_work runs the work items in this process
    args = argparse.Namespace(
        input_folder=str(source),
        output_folder=str(output),
        num_extract_workers=workers,
        num_merge_workers=workers,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    with _one_thread_while_forking(workers > 1):
        if trust:
            ds_to_universal(args)
            return
        verify_engine_files(source)
        with restricted_loads(source):
            ds_to_universal(args)


@contextmanager
def _one_thread_while_forking(forking: bool) -> Iterator[None]:
    """GNU OpenMP's thread pool does not survive fork: a process that has run a multi-threaded torch
    op (any trainer has) and then forks gives children that wait forever in their first parallel
    op (ds_to_universal's workers: a tensor clone). With one thread set in this process for the
    conversion, the forked workers inherit it and never enter OpenMP; torch's DataLoader workers
    set one thread for the same reason. The conversion itself is file reading and writing."""
    if not forking:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def restore_frozen_parameters(module: torch.nn.Module, checkpoint: Path, dp_rank: int) -> list[str]:
    """Every rank, after a universal load: set the frozen parameters (requires_grad False) from the
    checkpoint's consolidated weights; -> their names.

    A universal checkpoint holds only what the optimizer held: DeepSpeed's universal load (0.19.8)
    sets the trained parameters from their fp32 copies in `zero/` and reads no module weights, so a
    frozen parameter (all but the exit gate in stage II, `objective.kind=gate`) would keep the value
    this process built (the seeded initial weights, not the checkpoint's). model.safetensors holds
    every parameter in fp32, so they come back bit for bit. No tensor parallel here (the manager
    refuses a universal resume with it): a ZeRO-3 partition is gathered, set on data-parallel rank 0
    and partitioned again; a whole parameter is set on every rank."""
    frozen = [(name, param) for name, param in module.named_parameters() if not param.requires_grad]
    if not frozen:
        return []
    from ouro_train.checkpoint.weights import SafetensorsWeights, parameter_shapes

    source = SafetensorsWeights(checkpoint, parameter_shapes(module))
    for name, param in frozen:
        if hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if dp_rank == 0:
                    param.data.copy_(source.get(name))
        else:
            param.copy_(source.get(name))
    return [name for name, _ in frozen]
