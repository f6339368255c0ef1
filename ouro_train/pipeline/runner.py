"""The multi-stage runner: plan the stages, run them in order in one run directory, hand each
the previous stage's final checkpoint, skip finished stages, resume an interrupted one.

Layout of a pipeline run directory:

    runs/ouro_1p4b/
      data/                       the demo's shards (prepare: demo)
      warmup/                     a stage's own run directory (ouro-train run_dir)
        checkpoints/step_00004769 its final checkpoint: the next stage's input
        metrics.jsonl  final_eval.json  wandb/
      upcycle/                    an upcycle stage's output (weights, moments, train state)
      report.md  loss_per_step.png  exit_distribution.png

Training stages run as child processes (`python -m ouro_train.cli.train`, under torchrun when
nproc > 1, through `ouro_train.pipeline.torchrun`): the same command that launches the stage
alone, printed by the dry run. A stage is finished when its final checkpoint (step ==
train.steps, with the optimizer file) is complete; anything less is resumed by the stage itself
(checkpoint.resume=auto).

Signals: SIGTERM / SIGUSR1 / SIGINT to the runner go on to the running stage (once), which saves
a checkpoint and exits 75 (EXIT_STOPPED). The runner stops at the next safe point: when the
running stage ends, after an upcycle in progress (committed by one rename, so complete or
absent), or before the next stage would start; it never starts a stage after a signal, and
exits 75 too, as does a stage stopped by a signal sent to it directly (exit 75). The same
command resumes.

This file is the run loop (`run`). The stages are planned in plan.py, the dry run's plan is
dry_run.py, a training stage's command commands.py (its overrides: overrides.py), the signal
forwarding signals.py, and the upcycle and eval stages, run in process, in_process.py.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from ouro_train.checkpoint.errors import CheckpointError
from ouro_train.pipeline.commands import child_env, stage_command
from ouro_train.pipeline.in_process import run_eval, run_upcycle
from ouro_train.pipeline.plan import PlannedStage, check_layout, plan, select, stage_done
from ouro_train.pipeline.signals import ForwardSignals
from ouro_train.pipeline.spec import PipelineSpec
from ouro_train.train.signals import EXIT_STOPPED


class PipelineError(RuntimeError):
    """A stage failed or cannot start; the message names the stage and what to do."""


def run(
    spec: PipelineSpec,
    run_dir: Path,
    extra: list[str],
    nproc: int = 1,
    start_at: str | None = None,
    stop_after: str | None = None,
) -> int:
    """Run the selected stages; -> 0 when they are all finished, EXIT_STOPPED (75) when stopped by a
    signal (to the runner, or to a stage directly) at a safe point: the same call resumes."""
    planned = plan(spec, run_dir, extra)
    selected = select(planned, start_at, stop_after)
    check_layout(selected, nproc, "nproc")
    run_dir.mkdir(parents=True, exist_ok=True)
    with ForwardSignals() as forward:

        def stopped(where: str) -> int:
            print(
                f"[pipeline] stopped by signal {forward.requested} ({signal.Signals(forward.requested).name}) {where}; "
                "run the same command again to continue",
                flush=True,
            )
            return EXIT_STOPPED

        if spec.prepare == "demo":
            from ouro_train.data.demo_shards import build_demo_shards

            vocab = next(p.cfg for p in planned if p.cfg is not None).data.tokenizer_vocab_size
            build_demo_shards(run_dir / "data", vocab)
        for stage in selected:
            name = stage.spec.name
            if stage_done(stage):
                print(f"[pipeline] {name}: finished earlier ({stage.output}), skipped", flush=True)
                continue
            if forward.requested is not None:  # between two stages: start nothing more
                return stopped(f"before {name}")
            if stage.input is not None and not _input_ready(planned, stage):
                raise CheckpointError(
                    f"stage {name} starts from {stage.input}, which is missing or incomplete: run the stage that "
                    f"writes it first (start_at=<that stage>), or point the stage elsewhere with "
                    f"checkpoint.init_from"
                )
            if stage.spec.kind == "eval":
                run_eval(stage)  # in process; eval.json is written last, by one rename
                if forward.requested is not None:
                    return stopped(f"after {name}")
                continue
            if stage.spec.kind == "upcycle":
                # In process and committed by one rename: a signal during it is handled once it is complete.
                run_upcycle(stage)
                if forward.requested is not None:
                    return stopped(f"during {name} (its output is complete)")
                continue
            command = stage_command(spec, stage, nproc)
            print(f"[pipeline] {name}: {'resuming' if stage.directory.exists() else 'starting'}", flush=True)
            forward.child = subprocess.Popen(command, env=child_env())
            code = forward.child.wait()
            forward.child = None
            if forward.requested is not None:
                return stopped(f"during {name} (exit code {code})")
            if code == EXIT_STOPPED:
                print(
                    f"[pipeline] {name} was stopped by a signal sent to it (exit code {code}); run the same "
                    "command again to resume it",
                    flush=True,
                )
                return EXIT_STOPPED
            if code != 0:
                raise PipelineError(f"stage {name} failed (exit code {code}); its run directory is {stage.directory}")
            if not stage_done(stage):
                raise PipelineError(f"stage {name} ended without its final checkpoint {stage.output}")
    from ouro_train.pipeline.report import write_report

    report = write_report(spec, planned, run_dir)
    print(f"[pipeline] done: {len(selected)} stages; report {report}", flush=True)
    return 0


def _input_ready(planned: list[PlannedStage], stage: PlannedStage) -> bool:
    producer = next((p for p in planned if p.output == stage.input), None)
    return producer is not None and stage_done(producer)
