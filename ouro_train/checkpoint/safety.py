"""DeepSpeed's engine files are read with torch's weights-only unpickler, never a full one.

DeepSpeed 0.19.8 reads its checkpoint files with `torch.load(weights_only=False)` (its checkpoint
engine, the ZeRO optimizers' universal loaders, and every load in `ds_to_universal`), i.e. a full
unpickler: a crafted file could run anything on load. A scan of the pickle before DeepSpeed
reads it cannot close that: a scanner that does not execute the pickle must re-implement its
stack and memo exactly (every string opcode, BINPUT/BINGET, STACK_GLOBAL), and the file can be
swapped between the scan and the load.

So inside `restricted_loads()` every `torch.load` of this process is forced to weights-only:
torch reads `TORCH_FORCE_WEIGHTS_ONLY_LOAD` from the environment at each call of
`torch.serialization.load` and then uses its restricted unpickler (`torch._weights_only_unpickler`)
even where the caller passed `weights_only=False`. That unpickler builds only tensors, containers,
numbers and strings plus the globals allowlisted with `torch.serialization.add_safe_globals`
(here DeepSpeed's three value classes, `DEEPSPEED_VALUE_CLASSES`); it has no STACK_GLOBAL,
calls (REDUCE) and object builds (NEWOBJ, BUILD) only allowlisted types, and refuses anything else
before running it. The environment variable also reaches the worker processes that
`ds_to_universal` forks inside the block (see universal.py).

A refused file raises `CheckpointError` naming it (found from the `torch.load` frame of the
error), the global or opcode torch refused, and the ways out. `checkpoint.trust_engine_files=true`
skips all of this (DeepSpeed then loads as it always did).
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ouro_train.checkpoint.errors import CheckpointError

FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_NOT = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # torch raises if both are set; unset inside the block

# What DeepSpeed's own checkpoints hold besides tensors and containers (ZeRO 0/1/2/3 engine files
# and their universal conversion, deepspeed 0.19.8): the optimizer shards' loss scaler, ZeRO
# stage and parameter slice mappings.
DEEPSPEED_VALUE_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)

WAY_OUT = (
    "if you wrote this checkpoint and trust it, set checkpoint.trust_engine_files=true; otherwise resume "
    "from an earlier checkpoint"
)
# For the files ouro-train itself writes and always reads weights-only (RNG states, the local
# engine's file): no switch turns that off, so the only way out is another checkpoint.
NO_WAY_OUT = "ouro-train reads this file only with that unpickler: resume from an earlier checkpoint"

_REFUSED = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module"),
    re.compile(r"reduce for unrecognized function (.+?)(?: which belongs to .*)?$", re.MULTILINE),
    re.compile(r"Can only build .*? but got (.+)$", re.MULTILINE),
    re.compile(r"Can only create new object .*? but got (.+)$", re.MULTILINE),
)
_OPERAND = re.compile(r"Unsupported operand (\d+)")
_OPCODES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}


def allow_deepspeed_values() -> None:
    """Allowlist DeepSpeed's value classes for weights-only loads (idempotent, process-wide)."""
    import importlib

    classes = []
    for dotted in DEEPSPEED_VALUE_CLASSES:
        module, name = dotted.rsplit(".", 1)
        classes.append(getattr(importlib.import_module(module), name))
    torch.serialization.add_safe_globals(classes)


@contextmanager
def restricted_loads(where: Path | str) -> Iterator[None]:
    """Every torch.load in this process (and in processes forked inside the block) is weights-only.

    `where`: what is being loaded, named in the error when the failing file cannot be found.
    A file the weights-only unpickler refuses raises CheckpointError. Sets and restores the
    environment switch; it is process-wide while the block runs (other threads' loads are
    restricted too, which only makes them safer).
    """
    allow_deepspeed_values()
    saved = {key: os.environ.get(key) for key in (FORCE, FORCE_NOT)}
    os.environ[FORCE] = "1"
    os.environ.pop(FORCE_NOT, None)
    try:
        yield
    except pickle.UnpicklingError as error:
        raise refused(error, failed_file(error), where) from error
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def failed_file(error: BaseException) -> str | None:
    """The file a `torch.load` was reading when `error` was raised in it (in this process), if any."""
    tb = error.__traceback__
    found = None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code is torch.serialization.load.__code__:
            f = frame.f_locals.get("f")
            if isinstance(f, (str, bytes, os.PathLike)):
                found = os.fsdecode(f)
        tb = tb.tb_next
    return found


def refused_what(message: str) -> str:
    """What torch's weights-only unpickler refused, from its error message."""
    for pattern in _REFUSED:
        match = pattern.search(message)
        if match:
            return f"its pickle references {match.group(1).strip()}, which is not allowlisted"
    match = _OPERAND.search(message)
    if match:
        code = int(match.group(1))
        return f"its pickle uses the opcode {_OPCODES.get(code, code)}, which that unpickler does not accept"
    # torch's own text advises re-running with weights_only=False, which would run the payload: never
    # passed on (nor anything else of its advice).
    lines = [
        line.strip()
        for line in message.splitlines()
        if line.strip() and not any(x in line for x in ("WeightsUnpickler", "weights_only", "Weights only load failed"))
    ]
    return "its pickle failed there: " + next(iter(lines), "")[:200]


def refused(error: BaseException, path: str | None, where: Path | str, trustable: bool = True) -> CheckpointError:
    """`trustable`: a DeepSpeed engine file, which checkpoint.trust_engine_files lets DeepSpeed
    unpickle fully; other files (RNG states, the local engine's) are always read weights-only."""
    name = path if path is not None else f"a file under {where}"
    return CheckpointError(
        f"{name}: refused by torch's weights-only unpickler: {refused_what(str(error))} (checkpoints written by "
        "ouro-train hold only tensors, containers and DeepSpeed's value classes; a full unpickler could run code "
        f"from this one); {WAY_OUT if trustable else NO_WAY_OUT}"
    )


def safe_torch_load(path: Path, *, trustable: bool = False, mmap: bool = True):
    """Read one torch.save file of a checkpoint with torch's weights-only unpickler, or raise
    CheckpointError naming it: refused (what the pickle referenced) or unreadable (truncated,
    corrupt, foreign). Every torch file of a checkpoint that ouro-train reads itself goes through
    here. With `mmap`, storages of the (zip) torch format are memory-mapped: no tensor data is
    read. DeepSpeed's value classes are allowlisted on first need (importing DeepSpeed takes
    seconds; single-process checkpoints never reference them)."""
    path = Path(path)
    mmap = mmap and zipfile.is_zipfile(path)
    for attempt in range(2):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as error:
            if attempt == 0 and any(name in str(error) for name in DEEPSPEED_VALUE_CLASSES):
                allow_deepspeed_values()
                continue
            raise refused(error, str(path), path, trustable) from error
        except Exception as error:  # noqa: BLE001 - any other failure: truncated, corrupt or foreign
            detail = " ".join(line for line in str(error).splitlines() if "weights_only" not in line)
            raise CheckpointError(
                f"{path}: not a readable torch checkpoint file ({type(error).__name__}: {detail[:300]}); it is "
                "truncated, corrupt or foreign: resume from an earlier checkpoint"
            ) from error
    raise AssertionError("unreachable")


def load_engine_file(path: Path):
    """A DeepSpeed engine file, weights-only (`safe_torch_load`), or CheckpointError naming it."""
    return safe_torch_load(path, trustable=True)


def verify_engine_files(directory: Path) -> None:
    """Raise CheckpointError naming the first *.pt under `directory` the weights-only unpickler refuses.

    Gives a clear message before a long operation (the universal conversion) starts; the
    protection itself is `restricted_loads` around the loads, since a file checked here could
    still be replaced before it is read.
    """
    for path in sorted(Path(directory).rglob("*.pt")):
        load_engine_file(path)
