"""Rolling back after a divergence, the way large runs do: back to a healthy checkpoint, on with a
lower learning rate, optionally past the stretch of data that blew up.

The stability guard (optim/guard.py) ends a diverging run with exit status 3, and its message
prints the command built here (`rollback_command`): the same `ouro-train` invocation with
`checkpoint.resume=<the newest healthy checkpoint> checkpoint.rollback_lr=<a lower peak LR>`.
That resume is allowed to differ from the checkpoint in its peak learning rate only (everything
else about the training config is still checked, checkpoint/manager.py) and:

- the checkpoints after it, from the abandoned trajectory, are moved aside to
  `checkpoints/rolled_back-<step>-<time>/` with the metrics lines they logged: never resumed,
  never rotated away by retention, kept for the post-mortem until the user deletes them;
- `checkpoint.rollback_skip_batches=N` steps over the next N optimizer steps' worth of data;
- the rollback is recorded at once (the checkpoint rolled back to is saved again with it, the
  skipped data and the reset guard: `rollbacks` in its and every later train_state.json), in the
  next step's metrics (`rollback_*`), and every later resume keeps the new rate (`resumed_lr`), so
  the plain command continues the run;
- running the same rollback command again (a requeued job, a resume after Ctrl-C) continues from
  the newest checkpoint that carries it (`already_made`) instead of rolling back twice.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from ouro_train.checkpoint.errors import CheckpointError
from ouro_train.checkpoint.store import (
    LATEST,
    complete_checkpoints,
    read_train_state,
    step_name,
    step_of,
)
from ouro_train.config.schema import Config
from ouro_train.utils.atomic import atomic_write_text

SKIP_KEY = "checkpoint.rollback_skip_batches"


def saved_peak_lr(state: dict) -> float | None:
    """The peak learning rate a checkpoint was trained with (after any earlier rollback)."""
    value = state.get("config", {}).get("optim.lr")
    return None if value is None else float(value)


def resumed_lr(state: dict) -> float | None:
    """The peak learning rate a plain resume of this checkpoint continues with: that of its last
    rollback, if it was rolled back (None: the config's, as for any run)."""
    rollbacks = state.get("rollbacks") or []
    return float(rollbacks[-1]["lr"]) if rollbacks else None


def plan(cfg: Config, checkpoint: Path, state: dict, current_lr: float) -> dict:
    """The record of the rollback that `cfg` asks for from `checkpoint` (train state `state`);
    `current_lr`: the peak LR a plain resume would use."""
    new_lr = cfg.checkpoint.rollback_lr if cfg.checkpoint.rollback_lr is not None else current_lr
    return {
        "from_checkpoint": checkpoint.name,
        "from_step": int(state["step"]),
        "previous_lr": saved_peak_lr(state),
        "lr": float(new_lr),
        "skip_batches": cfg.checkpoint.rollback_skip_batches,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def already_made(record: dict, root: Path) -> Path | None:
    """The newest checkpoint that carries this very rollback (same checkpoint, rate and skip): the
    same command run again (a requeued job, a resume after Ctrl-C) continues from there instead of
    rolling back a second time (which would throw the progress away and skip the data again)."""
    same = (record["from_checkpoint"], record["lr"], record["skip_batches"])
    for later in reversed(complete_checkpoints(root)):
        if step_of(later) < record["from_step"]:
            break
        try:
            done = read_train_state(later).get("rollbacks") or []
        except CheckpointError:
            continue
        if any((r["from_checkpoint"], r["lr"], r["skip_batches"]) == same for r in done):
            return later
    return None


def set_aside_newer(root: Path, record: dict, metrics_path: Path) -> Path | None:
    """Rank 0, before anything is saved: move the checkpoints after the rollback's (complete or not)
    into `rolled_back-<step>-<time>/` with a copy of metrics.jsonl (the caller then truncates it),
    and point `latest` at the checkpoint rolled back to. -> that folder, or None if nothing moved."""
    step = record["from_step"]
    newer = [p for p in root.iterdir() if step_of(p) is not None and step_of(p) > step] if root.is_dir() else []
    if not newer:
        return None
    aside = root / f"rolled_back-{step_name(step)}-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for path in sorted(newer):
        os.replace(path, aside / path.name)
    if metrics_path.is_file():
        shutil.copy2(metrics_path, aside / metrics_path.name)
    atomic_write_text(root / LATEST, record["from_checkpoint"], durable=True)
    return aside


def describe(record: dict, aside: Path | None) -> str:
    text = f"rolled back to {record['from_checkpoint']} (step {record['from_step']}): peak learning rate "
    text += f"{record['previous_lr']:g} -> {record['lr']:g}"
    if record["skip_batches"]:
        text += f", skipping the next {record['skip_batches']} batches of data"
    if aside is not None:
        text += f"; the later checkpoints and their metrics are in {aside} (never resumed; delete it when done)"
    return text


def metrics_fields(record: dict) -> dict:
    """What the first step after the rollback carries in metrics.jsonl (and wandb)."""
    return {
        "rollback_from_step": record["from_step"],
        "rollback_lr": record["lr"],
        "rollback_skip_batches": record["skip_batches"],
    }


def rerun_command(settings: dict[str, str], argv: list[str] | None = None) -> str:
    """The current ouro-train command line (torchrun / srun: under the same launcher) with the keys
    of `settings` set to their values (replacing any given, `+key=` and `~key` included)."""
    args = list(sys.argv[1:] if argv is None else argv)
    kept = [a for a in args if not a.lstrip("+~").startswith(tuple(f"{k}=" for k in settings))]
    return shlex.join(["ouro-train", *kept, *(f"{k}={v}" for k, v in settings.items())])


def rollback_command(checkpoint: Path, lr: float | None, argv: list[str] | None = None) -> str:
    """The command that rolls this run back to `checkpoint` at peak learning rate `lr` (None: a
    placeholder to fill in); a skip of an earlier rollback is not repeated."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.lstrip("+~").startswith(f"{SKIP_KEY}=")]
    rate = "<lower-rate>" if lr is None else f"{lr:g}"
    return rerun_command({"checkpoint.resume": str(checkpoint), "checkpoint.rollback_lr": rate}, args)
