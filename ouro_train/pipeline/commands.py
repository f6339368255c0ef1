"""The command a training stage is launched with: `train_args` (ouro-train's arguments: the base
recipe and the stage's overrides, the same for a local run and a SLURM job), `stage_command`
(python -m ouro_train.cli.train, under torchrun through ouro_train.pipeline.torchrun when nproc >
1; `for_display` quotes it as the dry run prints it) and `child_env` (the environment the stage's
process gets: DS_ACCELERATOR=cpu where there is no GPU).
"""

from __future__ import annotations

import os
import sys

from ouro_train.pipeline.plan import PlannedStage
from ouro_train.pipeline.spec import PipelineSpec


def train_args(spec: PipelineSpec, stage: PlannedStage) -> list[str]:
    """ouro-train's arguments for a training stage: the same whether the runner launches it here
    (stage_command) or a SLURM job does (ouro_train/pipeline/slurm.py, through launch/slurm.sbatch)."""
    return ["--config-name", spec.config_name, *stage.overrides]


def stage_command(spec: PipelineSpec, stage: PlannedStage, nproc: int, for_display: bool = False) -> list[str]:
    python = "python" if for_display else sys.executable
    launcher = [python, "-m", "ouro_train.cli.train"]
    if nproc > 1:
        # torchrun, exiting 75 when stopped by a signal (ouro_train/pipeline/torchrun.py); it passes
        # on only --signals-to-handle, whose default lacks SIGUSR1 (SLURM's "stop soon").
        from ouro_train.pipeline.torchrun import SHUTDOWN_TIMEOUT, SIGNALS_TO_HANDLE

        launcher = [python, "-m", "ouro_train.pipeline.torchrun", "--standalone", f"--nproc-per-node={nproc}"]
        launcher += [f"--signals-to-handle={SIGNALS_TO_HANDLE}", f"--shutdown-timeout={SHUTDOWN_TIMEOUT}"]
        launcher += ["-m", "ouro_train.cli.train"]
    args = train_args(spec, stage)
    return launcher + ([f"'{a}'" if any(c in a for c in " {}[]") else a for a in args] if for_display else args)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    try:
        import torch

        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:
        pass
    return env
