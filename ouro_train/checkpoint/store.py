"""Checkpoint directories: atomic commit, the `latest` pointer, discovery with fallback, retention.

    <run_dir>/checkpoints/
        step_00000100/              a complete checkpoint (renamed into place when whole)
            engine/                 model + optimizer (DeepSpeed engine checkpoint, or torch state dicts)
            rng/rank_00000.pt       python / numpy / torch RNG of each rank
            train_state.json        step, tokens, loader position, config hash, code version, layout
            model.safetensors       the full weights (weights.py)
            tokenizer.json          the training data's tokenizer, + tokenizer_info.json: its sha256,
                                    eos / bos ids, chat template (tokenizer_record.py)
            COMPLETE                written last, before the rename
        latest                      "step_00000100", replaced atomically after the rename
        .tmp-step_00000200/         a save in progress or interrupted: never read, removed on the next save

A crash or SIGKILL at any point leaves either the previous checkpoint as `latest` or the new one,
never a partial one that resume would pick up.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path

from ouro_train.checkpoint.errors import CheckpointError
from ouro_train.utils.atomic import atomic_write_text, fsync_dir, is_temporary

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"
TRAIN_STATE = "train_state.json"
_NAME = re.compile(r"^step_(\d{8})$")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path) -> int | None:
    """The step of a `step_N` checkpoint directory (complete or not), else None."""
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def temporary_dir(root: Path, step: int) -> Path:
    return root / f".tmp-{step_name(step)}"


def commit(root: Path, tmp: Path, step: int) -> Path:
    """Rank 0, after every rank wrote its part into `tmp`: mark complete, rename, move `latest`."""
    (tmp / COMPLETE).write_text(str(step))
    fsync_dir(tmp)
    final = root / step_name(step)
    old = root / f".old-{step_name(step)}"
    if final.exists():  # a re-save of the same step (the final save, a resume): swap, then delete
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    # Durable: fsyncs the pointer and then `root`, which makes both renames (step and pointer) stick.
    atomic_write_text(root / LATEST, step_name(step), durable=True)
    shutil.rmtree(old, ignore_errors=True)
    return final


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / TRAIN_STATE).is_file() and (path / "engine").is_dir()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def find_latest(root: Path, trust_engine_files: bool = False) -> Path | None:
    """The newest usable checkpoint: complete, and whose files are whole and readable the safe way
    (checkpoint_problem). A broken newer one (a truncated engine file, a corrupt train_state.json,
    a torch file the weights-only unpickler refuses) is passed over with a warning that names it;
    resume then continues from the one before."""
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if not is_complete(named):
            _warn(f"{pointer} names {named}, which is not a complete checkpoint; falling back")
    for candidate in reversed(complete_checkpoints(root)):
        problem = checkpoint_problem(candidate, trust_engine_files)
        if problem is None:
            return candidate
        _warn(f"skipping checkpoint {candidate}: {problem}; resuming from an earlier one (delete it to silence this)")
    return None


def rollback_target(root: Path) -> Path | None:
    """Where to roll back to after a divergence: the newest usable checkpoint recorded healthy
    (trainable weights) and saved before the last stretch of bad steps began, else the newest
    healthy one (its weights are those of the last accepted step: a bad step's update is never
    applied), else the newest usable one, else None. No warnings: it is for a message."""
    usable = [c for c in reversed(complete_checkpoints(root)) if checkpoint_problem(c) is None]
    healthy = [c for c in usable if _healthy(c)]
    calm = [c for c in healthy if not _state(c).get("health", {}).get("bad_steps_pending", 0)]
    return next(iter(calm + healthy + usable), None)


def _warn(message: str) -> None:
    log.warning(message)
    print(f"warning: {message}", file=sys.stderr, flush=True)


def checkpoint_problem(path: Path, trust_engine_files: bool = False) -> str | None:
    """Why a complete checkpoint cannot be resumed from, or None. Reads headers and small files,
    never tensor data: a torch file's zip directory (at its end, so a truncation shows) and its
    pickle through torch's weights-only unpickler (storages memory-mapped, not read; DeepSpeed's
    engine files not with `trust_engine_files`), a safetensors header against the file size,
    every JSON file (train state, tokenizer), and that every rank's files are there. So a file
    that would be refused or unreadable at load time makes the checkpoint broken here, where
    resume can still fall back to the one before."""
    from ouro_train.checkpoint.safety import safe_torch_load

    try:
        state = json.loads((path / TRAIN_STATE).read_text())
        world = int(state["world_size"])
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{path / TRAIN_STATE} is unreadable ({type(error).__name__}: {error})"
    # The universal-conversion cache and a conversion's leftover temporary (killed mid-way) are
    # derived data, rebuilt on demand: not part of the checkpoint.
    files = [
        f
        for f in path.rglob("*")
        if f.is_file() and not any(part == "universal" or is_temporary(part) for part in f.relative_to(path).parts)
    ]
    for file in files:
        problem = None
        if file.suffix == ".pt":
            problem = _zip_problem(file)
            deepspeed_file = "engine" in file.relative_to(path).parts and file.name != "engine.pt"
            if problem is None and not (trust_engine_files and deepspeed_file):
                try:
                    safe_torch_load(file, trustable=deepspeed_file)
                except CheckpointError as error:
                    return str(error)
        elif file.suffix == ".safetensors":
            problem = _safetensors_problem(file)
        elif file.suffix == ".json":
            try:
                json.loads(file.read_text())
            except (OSError, ValueError) as error:
                problem = f"unreadable JSON ({type(error).__name__}: {error})"
        if problem:
            return f"{file} is {problem}"
    rng = len(list((path / "rng").glob("rank_*.pt")))
    if rng != world:
        return f"{path / 'rng'} holds {rng} rank files, the checkpoint was written by {world} processes"
    shards = list((path / "engine").rglob("*optim_states.pt"))
    if shards and len(shards) != world:
        return (
            f"{path / 'engine'} holds {len(shards)} optimizer shards, the checkpoint was written by {world} processes"
        )
    return None


def _zip_problem(file: Path) -> str | None:
    try:
        with zipfile.ZipFile(file) as archive:
            size = file.stat().st_size
            for info in archive.infolist():
                if info.header_offset + info.compress_size > size:
                    return "truncated"
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        return f"truncated or corrupt ({error})"
    return None


def _safetensors_problem(file: Path) -> str | None:
    try:
        with file.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + length + end != file.stat().st_size:
            return "truncated"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        return f"truncated or corrupt ({type(error).__name__})"
    return None


def read_train_state(path: Path) -> dict:
    try:
        return json.loads((path / TRAIN_STATE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"{path / TRAIN_STATE}: unreadable train state ({error}); this checkpoint is "
            "corrupt, delete it to resume from the previous one"
        ) from error


def read_train_state_if_any(path: Path) -> dict:
    """The train state of a directory that may have none (an ouro-import output): {} then."""
    return read_train_state(path) if (path / TRAIN_STATE).is_file() else {}


def _state(path: Path) -> dict:
    try:
        return json.loads((path / TRAIN_STATE).read_text())
    except (OSError, ValueError):
        return {"healthy": False}


def _healthy(path: Path) -> bool:
    return bool(_state(path).get("healthy", True))


def apply_retention(root: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last`, except every `keep_every`-th
    step (0: none kept for that reason) and the newest healthy one; also leftovers of interrupted
    saves. Returns what went."""
    removed = []
    found = complete_checkpoints(root)
    keep = set(found[-keep_last:]) if keep_last > 0 else set(found)
    # The newest healthy checkpoint (trainable weights, see optim/guard.py) stays too, and so does
    # the newest one saved with no bad step pending: a run of bad steps cannot rotate the state
    # from before it away (where a rollback goes, `rollback_target`).
    healthy = [p for p in found if _healthy(p)]
    calm = [p for p in healthy if not _state(p).get("health", {}).get("bad_steps_pending", 0)]
    keep.update(group[-1] for group in (healthy, calm) if group)
    for path in found:
        step = int(_NAME.match(path.name).group(1))
        if path in keep or (keep_every > 0 and step % keep_every == 0):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    for leftover in root.glob(".tmp-step_*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return removed
