"""`ouro-train`: the hydra entry point. `ouro-train model=ouro_1p4b dry_run=true`, `ouro-train --config-name demo`.

It parses the recipe into a typed config, runs `ouro_train.train.stage.run_stage` (or `dry_run`)
and turns the outcome into an exit status (train/signals.py); the work is all in the library.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from ouro_train.config.schema import ConfigError
from ouro_train.config.store import RECIPES_DIR, register_configs, to_config
from ouro_train.train.guard import TrainingDiverged
from ouro_train.train.rundir import RunDirError
from ouro_train.train.signals import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_STOPPED
from ouro_train.train.stage import StoppedBySignal, dry_run, run_stage


@hydra.main(config_path=str(RECIPES_DIR), config_name="config", version_base="1.3")
def _hydra_main(raw: DictConfig) -> None:
    from ouro_train.checkpoint.store import CheckpointError
    from ouro_train.data.manifest import DataError

    try:
        cfg = to_config(raw)
        if cfg.dry_run:
            dry_run(cfg)
        else:
            run_stage(cfg)
    except (ConfigError, DataError, CheckpointError, RunDirError) as error:
        # Bad input is the user's to fix: the message names the key or file; no traceback.
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except TrainingDiverged as error:
        print(f"error: training diverged: {error}", file=sys.stderr)
        print(diverged_advice(error), file=sys.stderr)
        sys.exit(EXIT_DIVERGED)
    except StoppedBySignal:
        sys.exit(EXIT_STOPPED)


def diverged_advice(error: TrainingDiverged) -> str:
    """Where to go back to and the exact command (checkpoint/rollback.py)."""
    from ouro_train.checkpoint.rollback import rollback_command

    if error.rollback_checkpoint is None:
        return (
            "No checkpoint of this run to roll back to (checkpoint.every_steps / every_minutes were off or it "
            "diverged before the first save): start a new run directory with a lower optim.lr"
            + (f", e.g. optim.lr={error.rollback_lr:g}" if error.rollback_lr else "")
        )
    note = f" ({error.rollback_note})" if error.rollback_note else ""
    launcher = " under the same launcher (torchrun / srun)" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    return (
        f"Roll back to {error.rollback_checkpoint}{note} with a lower peak learning rate{launcher}:\n"
        f"  {rollback_command(error.rollback_checkpoint, error.rollback_lr)}\n"
        "(add checkpoint.rollback_skip_batches=N to also step over the next N batches of data)"
    )


def main() -> None:
    if not RECIPES_DIR.is_dir():
        sys.exit(
            f"error: recipes directory {RECIPES_DIR} not found; install ouro-train from a checkout "
            "with `make setup` (pip install -e .)"
        )
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
