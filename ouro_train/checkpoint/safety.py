"""Refuse engine files that could run code when DeepSpeed unpickles them.

DeepSpeed 0.19.8 reads its checkpoint files with `torch.load(weights_only=False)`, i.e. a full
unpickler: a crafted file could execute anything on load. Before DeepSpeed reads a directory,
we list every global each file's pickle references (scanning `data.pkl` inside the torch zip
with pickletools: no tensor data is read, nothing is executed) and refuse a file that names
anything but tensor rebuilding, containers and the three DeepSpeed value classes its
checkpoints hold. That is the allowlist idea of torch's `weights_only` loader, applied where
DeepSpeed does not use it.
"""

from __future__ import annotations

import pickletools
import re
import zipfile
from pathlib import Path

from ouro_train.checkpoint.store import CheckpointError

ALLOWED = {
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch._tensor._rebuild_from_type_v2",
    "torch.Size",
    "torch.Tensor",
    "torch.device",
    "torch.nn.parameter.Parameter",
    "torch.serialization._get_layout",
    # What DeepSpeed's own checkpoints hold (seen in ZeRO 0/1/2/3 and universal checkpoints).
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
}
_STORAGE_OR_DTYPE = re.compile(
    r"^torch\.(\w+Storage|float\d*|bfloat16|half|double|int\d*|uint\d+|bool|long|short|complex\d+)$"
)
_STRINGS = ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8")


def pickle_globals(path: Path) -> set[str]:
    """Every global (module.name) that the pickle of a torch.save file references."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            data = archive.read(name)
    except (zipfile.BadZipFile, StopIteration, OSError) as error:
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint file ({error}); it is truncated, corrupt or foreign: resume "
            "from an earlier checkpoint"
        ) from error
    found: set[str] = set()
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in _STRINGS:
                strings.append(arg)
            elif op.name == "GLOBAL":
                found.add(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL":
                found.add(f"{strings[-2]}.{strings[-1]}" if len(strings) >= 2 else "<unknown>")
    except ValueError as error:
        raise CheckpointError(f"{path}: its pickle is corrupt ({error}); resume from an earlier checkpoint") from error
    return found


def verify_engine_files(directory: Path) -> None:
    """Raise CheckpointError if any *.pt under `directory` references a global outside the allowlist."""
    for path in sorted(Path(directory).rglob("*.pt")):
        unexpected = sorted(g for g in pickle_globals(path) if g not in ALLOWED and not _STORAGE_OR_DTYPE.match(g))
        if unexpected:
            raise CheckpointError(
                f"{path}: its pickle references {unexpected[:4]}, which checkpoints written by ouro-train never "
                "contain; DeepSpeed would unpickle it with weights_only=False (it could run code), so it is not "
                "loaded. If you wrote it and trust it, set checkpoint.trust_engine_files=true"
            )
