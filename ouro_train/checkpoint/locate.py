"""Which model directory a path people type means: the one place `ouro-generate`, `ouro-eval` and
`ouro-export` resolve their MODEL argument.

A user names what they see after training: the checkpoint itself (`runs/try/checkpoints/step_N`),
the run directory (`runs/try`), a pipeline stage's directory (`runs/demo_pipeline/sft`, which is
that stage's run directory, pipeline/plan.py), or the `checkpoints/` directory. The last three
mean the newest complete checkpoint there whose files are whole (store.find_latest, read-only: an
interrupted save or a truncated newer checkpoint is passed over, with a warning naming it), and
the tools say which one they used. A directory that holds weights itself (a checkpoint, an
`ouro-import` or `ouro-upcycle` output, an `ouro-export` / Hugging Face directory) or a weights
file is taken as it is, as before. Anything else is a CheckpointError naming the path and what
was expected, instead of the confusing error a loader would give on the wrong kind of directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ouro_train.checkpoint.errors import CheckpointError
from ouro_train.checkpoint.store import LATEST, find_latest
from ouro_train.checkpoint.weights import WEIGHTS

CHECKPOINTS = "checkpoints"
EXPECTED = (
    "expected a checkpoint directory (checkpoints/step_N), a run or pipeline stage directory holding "
    "checkpoints/, a checkpoints/ directory, or an ouro-import / ouro-export output"
)


def resolve_model_path(path: Path) -> tuple[Path, str | None]:
    """-> (the model directory or weights file to read, a line saying which checkpoint was picked,
    or None when `path` is used as given). Raises CheckpointError naming `path` when it holds no model."""
    path = Path(path)
    if path.is_file() or _is_model_dir(path):
        return path, None
    if not path.exists():
        raise CheckpointError(f"{path}: not found; {EXPECTED}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory or a weights file; {EXPECTED}")
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    if root is path and not _is_checkpoints_dir(path):
        stages = sorted(p.name for p in path.iterdir() if (p / CHECKPOINTS).is_dir() or _is_model_dir(p))
        if stages:  # a pipeline run directory: its stages are the run directories
            raise CheckpointError(
                f"{path}: holds no checkpoint itself but these stage directories do: {', '.join(stages)}; "
                f"name one (e.g. {path / stages[-1]})"
            )
        raise CheckpointError(f"{path}: holds no checkpoint; {EXPECTED}")
    latest = find_latest(root)
    if latest is None:
        raise CheckpointError(
            f"{root}: no complete, usable checkpoint (an interrupted or broken save is never read); "
            "train until one is written, or name a checkpoint directory"
        )
    if not (latest / WEIGHTS).is_file():
        raise CheckpointError(
            f"{latest}: the newest complete checkpoint of {path} has no {WEIGHTS}; name another checkpoint directory"
        )
    return latest, f"using {latest} (newest complete checkpoint of {path})"


def locate_model(path: Path) -> Path:
    """resolve_model_path for a CLI: the line saying which checkpoint was picked goes to stderr
    (stdout stays what the tool prints, e.g. ouro-generate --json's lines)."""
    found, note = resolve_model_path(path)
    if note:
        print(note, file=sys.stderr, flush=True)
    return found


def _is_model_dir(path: Path) -> bool:
    """Weights here: a checkpoint, an ouro-import / ouro-upcycle output, or a Hugging Face directory."""
    return path.is_dir() and ((path / WEIGHTS).is_file() or (path / "config.json").is_file())


def _is_checkpoints_dir(path: Path) -> bool:
    """`<run_dir>/checkpoints`: a `latest` pointer or step_N directories (complete or not)."""
    return (path / LATEST).is_file() or any(p.name.startswith("step_") for p in path.iterdir() if p.is_dir())
