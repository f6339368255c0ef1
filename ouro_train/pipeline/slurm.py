"""`ouro-pipeline ... launch=slurm`: every remaining stage as its own SLURM job, chained.

Each stage is one `sbatch`, after the one before it (`--dependency=afterok:<its job id>`):

* a training stage is launch/slurm.sbatch with the stage's ouro-train arguments, exactly those the
  runner gives it locally (commands.train_args: its run directory, checkpoint.resume=auto and
  checkpoint.init_from=<the previous stage's final checkpoint>). The script makes it requeue-safe:
  a requeued job resumes from the stage's newest checkpoint, and one whose stage is finished
  exits 0 at once; multi-node is srun + torchrun with a rendezvous at the first node.
* an upcycle or eval stage is one process: the runner itself for that stage alone
  (`python -m ouro_train.cli.pipeline ... start_at=S stop_after=S`), which skips it when its
  output is complete (an upcycle is committed by one rename), so a requeue is safe too.

Stages already finished are not submitted. `sbatch=` passes options to every job (--nodes,
--gpus-per-node, --time, --partition, --account...; an upcycle or eval job gets --nodes=1 after
them); nproc > 1 sets NPROC_PER_NODE (default: the GPUs SLURM gives each node). Logs:
<run_dir>/slurm-<job name>-<job id>.out. `dry_run=true` prints the sbatch lines, submitting nothing.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from ouro_train.config.schema import ConfigError
from ouro_train.pipeline.commands import train_args
from ouro_train.pipeline.plan import PlannedStage, stage_done
from ouro_train.pipeline.runner import PipelineError
from ouro_train.pipeline.spec import PipelineSpec

SBATCH_SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "slurm.sbatch"


def sbatch_lines(
    spec: PipelineSpec,
    recipe: Path,
    run_dir: Path,
    planned: list[PlannedStage],
    selected: list[PlannedStage],
    overrides: list[str],
    nproc: int,
    options: str,
    warnings: list[str] | None = None,
) -> list[tuple[PlannedStage, list[str]]]:
    """-> (stage, its sbatch command without the dependency) for every selected stage not finished.

    A first stage whose input is not there is an error, or with `warnings` (the dry run) a warning."""
    extra = shlex.split(options)
    export = [f"PYTHON={sys.executable}"] + ([f"NPROC_PER_NODE={nproc}"] if nproc > 1 else [])
    remaining = [stage for stage in selected if not stage_done(stage)]
    submitted = {stage.output for stage in remaining}
    commands = []
    for stage in remaining:
        if stage.input is not None and stage.input not in submitted and not _ready(planned, stage):
            message = (
                f"stage {stage.spec.name} starts from {stage.input}, which is missing or incomplete and no job "
                "submitted here writes it: start_at=<the stage that writes it>"
            )
            if warnings is None:
                raise PipelineError(message)
            warnings.append(message)
        name = f"{spec.name}-{stage.spec.name}"
        head = [
            "sbatch",
            "--parsable",
            f"--job-name={name}",
            f"--output={run_dir}/slurm-%x-%j.out",
            f"--export=ALL,{','.join(export)}",
            *extra,
        ]
        if stage.cfg is not None:
            commands.append((stage, [*head, str(SBATCH_SCRIPT), *train_args(spec, stage)]))
            continue
        runner = [
            sys.executable,
            "-m",
            "ouro_train.cli.pipeline",
            f"pipeline={recipe}",
            f"run_dir={run_dir}",
            f"start_at={stage.spec.name}",
            f"stop_after={stage.spec.name}",
            *overrides,
        ]
        one = ["--nodes=1", "--ntasks=1", "--requeue", "--open-mode=append"]
        commands.append((stage, [*head, *one, f"--wrap=exec {shlex.join(runner)}"]))
    return commands


def _ready(planned: list[PlannedStage], stage: PlannedStage) -> bool:
    producer = next((p for p in planned if p.output == stage.input), None)
    return producer is not None and stage_done(producer)


def submit(
    spec: PipelineSpec,
    recipe: Path,
    run_dir: Path,
    planned: list[PlannedStage],
    selected: list[PlannedStage],
    overrides: list[str],
    nproc: int,
    options: str,
    dry_run: bool,
) -> int:
    """Submit (or with `dry_run` print) one job per remaining stage, each after the one before."""
    if not SBATCH_SCRIPT.is_file():
        raise ConfigError(f"launch=slurm needs {SBATCH_SCRIPT} (a source checkout of ouro-train)")
    warnings: list[str] = []
    commands = sbatch_lines(
        spec, recipe, run_dir, planned, selected, overrides, nproc, options, warnings if dry_run else None
    )
    for warning in warnings:
        print(f"# warning: {warning}")
    if not commands:
        print(f"[pipeline] every selected stage is finished in {run_dir}; nothing to submit")
        return 0
    print(f"{'#' if dry_run else '[pipeline]'} {spec.name}: {len(commands)} SLURM jobs, each after the one before")
    if not dry_run and spec.prepare == "demo":
        from ouro_train.data.demo_shards import build_demo_shards

        vocab = next(p.cfg for p in planned if p.cfg is not None).data.tokenizer_vocab_size
        build_demo_shards(run_dir / "data", vocab)
    if not dry_run:
        run_dir.mkdir(parents=True, exist_ok=True)
    previous = None
    for index, (stage, command) in enumerate(commands):
        after = [f"--dependency=afterok:{previous}"] if index > 0 else []
        if dry_run:  # a shell script: each line a job, its id in $jobN
            after = [f"--dependency=afterok:$job{index}"] if index > 0 else []
            line = " ".join([shlex.join(command[:2]), *after, shlex.join(command[2:])])
            print(f"job{index + 1}=$({line})  # {stage.spec.name}")
            continue
        command = [*command[:2], *after, *command[2:]]
        out = subprocess.run(command, capture_output=True, text=True, env=os.environ)
        if out.returncode != 0:
            raise PipelineError(
                f"sbatch for stage {stage.spec.name} failed ({out.returncode}): {out.stderr.strip()}; the jobs "
                f"submitted before it stay queued (scancel them, or submit the rest with start_at={stage.spec.name})"
            )
        previous = out.stdout.strip().split(";")[0]
        print(f"[pipeline] {stage.spec.name}: job {previous}: {shlex.join(command)}", flush=True)
    if dry_run:
        print("# dry run: nothing submitted (these lines, run in a shell, submit the same jobs)")
        return 0
    print(
        f"[pipeline] logs: {run_dir}/slurm-<job name>-<job id>.out. A requeued job resumes its stage; if a job "
        "fails, the later ones stay pending (DependencyNeverSatisfied): scancel them and run this command again "
        "(finished stages are skipped). The report: the same ouro-pipeline command without launch=slurm, once all "
        "are done (it skips every finished stage)."
    )
    return 0
