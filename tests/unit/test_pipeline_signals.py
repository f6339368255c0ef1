"""The pipeline runner stops at a safe point on SIGTERM, in process and without training: the
training stages' child processes are stand-ins (they "train" by being waited for), the upcycle
is the real one on a stand-in checkpoint, and each signal is raised from inside the step it must
interrupt, so the timing is exact. The end-to-end SIGTERM during a real stage is
tests/integration/test_pipeline.py."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ouro_train.pipeline import runner
from ouro_train.pipeline.commands import stage_command
from ouro_train.pipeline.plan import PlannedStage, plan, stage_done
from ouro_train.pipeline.spec import load_pipeline
from ouro_train.train.signals import EXIT_STOPPED
from ouro_train.utils.atomic import is_temporary

STAGES = ["warmup", "stable1", "upcycle", "stable2", "ct_anneal", "longct", "midtrain", "sft", "gate_training", "eval"]


def write_final_checkpoint(stage: PlannedStage) -> None:
    """What a finished stage leaves for the next: weights, Adam moments, train state."""
    from ouro_train.checkpoint.optimizer_state import OPTIMIZER, save_optimizer_state
    from ouro_train.checkpoint.weights import WEIGHTS, save_weights
    from ouro_train.model import LoopLM

    model = LoopLM(stage.cfg.model)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    moments = {
        f"{kind}.{name}": torch.zeros_like(p) for name, p in weights.items() for kind in ("exp_avg", "exp_avg_sq")
    }
    stage.output.mkdir(parents=True)
    save_weights(weights, stage.output / WEIGHTS, stage.cfg.model)
    save_optimizer_state(moments | {"step": torch.tensor([100.0], dtype=torch.float64)}, stage.output / OPTIMIZER)
    state = {"step": stage.cfg.train.steps, "final": True, "next_lr": 3e-3, "loader": None, "tokens": 1}
    (stage.output / "train_state.json").write_text(json.dumps(state))


class FakeStages:
    """Stand-ins for the training stages' processes. A stage is launched by `popen` (its name is
    its stage_name= override), runs `during[name]` while the runner waits for it, and is finished
    when it exits 0 (the stage before the upcycle writes a real final checkpoint)."""

    def __init__(self, planned: list[PlannedStage]) -> None:
        self.planned = {p.spec.name: p for p in planned}
        self.done: set[str] = set()
        self.launched: list[str] = []
        self.sent: list[tuple[str, int]] = []  # signals the runner sent to a running stage
        self.exit_codes: dict[str, int] = {}
        self.during: dict[str, callable] = {}
        self.on_stage_done: dict[str, callable] = {}

    def popen(self, command: list[str], env=None) -> FakeChild:
        name = next(a.split("=", 1)[1] for a in command if a.startswith("stage_name="))
        self.launched.append(name)
        return FakeChild(self, name)

    def evaluate(self, stage: PlannedStage) -> None:
        """The eval stage, run in process by the runner: recorded like a launch."""
        self.launched.append(stage.spec.name)
        self.done.add(stage.spec.name)

    def stage_done(self, stage: PlannedStage) -> bool:
        hook = self.on_stage_done.pop(stage.spec.name, None)
        if hook is not None:
            hook()
        if stage.spec.kind == "upcycle":
            return REAL_STAGE_DONE(stage)
        return stage.spec.name in self.done


class FakeChild:
    def __init__(self, stages: FakeStages, name: str) -> None:
        self.stages, self.name, self.returncode = stages, name, None

    def wait(self) -> int:
        if self.name in self.stages.during:
            self.stages.during[self.name]()
        code = self.stages.exit_codes.pop(self.name, 0)
        if code == 0:
            if self.name == "stable1":
                write_final_checkpoint(self.stages.planned[self.name])
            self.stages.done.add(self.name)
        self.returncode = code
        return code

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, signum: int) -> None:
        self.stages.sent.append((self.name, signum))


REAL_STAGE_DONE = stage_done


@pytest.fixture()
def pipeline(tmp_path, monkeypatch):
    spec = load_pipeline("demo")
    spec.prepare = None  # the stand-in stages read no data
    run_dir = tmp_path / "run"
    stages = FakeStages(plan(spec, run_dir, []))
    monkeypatch.setattr(runner, "subprocess", SimpleNamespace(Popen=stages.popen))
    monkeypatch.setattr(runner, "stage_done", stages.stage_done)
    monkeypatch.setattr(runner, "run_eval", stages.evaluate)
    monkeypatch.setattr("ouro_train.pipeline.report.write_report", lambda spec, planned, run_dir: run_dir / "report.md")
    return SimpleNamespace(spec=spec, run_dir=run_dir, stages=stages, run=lambda: runner.run(spec, run_dir, []))


def test_sigterm_between_two_stages_starts_no_further_stage(pipeline, capsys):
    stages = pipeline.stages
    # The runner asks whether stable1 is finished right after warmup ended: the signal comes then.
    stages.on_stage_done["stable1"] = lambda: signal.raise_signal(signal.SIGTERM)
    assert pipeline.run() == EXIT_STOPPED == 75
    assert stages.launched == ["warmup"] and stages.sent == []  # nothing was running to tell
    assert "stopped by signal 15 (SIGTERM) before stable1" in capsys.readouterr().out

    assert pipeline.run() == 0  # the same command continues with the next stage
    assert stages.launched == STAGES[:2] + STAGES[3:]
    assert "[pipeline] warmup: finished earlier" in capsys.readouterr().out


def test_sigterm_during_the_upcycle_finishes_it_and_starts_no_further_stage(pipeline, monkeypatch, capsys):
    import ouro_train.checkpoint.upcycle as upcycle

    stages, out = pipeline.stages, pipeline.run_dir / "upcycle"
    real_save = upcycle.save_optimizer_state
    seen = {}

    def save_then_signal(state, path):
        # Halfway through: the weights are written, the moments not yet; nothing under the final name.
        seen["partial output visible"] = out.exists()
        signal.raise_signal(signal.SIGTERM)
        real_save(state, path)

    monkeypatch.setattr(upcycle, "save_optimizer_state", save_then_signal)
    assert pipeline.run() == EXIT_STOPPED
    assert seen == {"partial output visible": False}
    assert stages.launched == ["warmup", "stable1"]  # stable2 did not start
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "optimizer.safetensors", "train_state.json"]
    # complete, committed by its rename: no temporary of the atomic write (utils/atomic.py) is left
    assert not [p for p in pipeline.run_dir.iterdir() if is_temporary(p.name)]
    assert "stopped by signal 15 (SIGTERM) during upcycle (its output is complete)" in capsys.readouterr().out

    monkeypatch.setattr(upcycle, "save_optimizer_state", real_save)
    assert pipeline.run() == 0
    assert "[pipeline] upcycle: finished earlier" in capsys.readouterr().out
    assert stages.launched == ["warmup", "stable1"] + STAGES[3:]


def test_a_signal_during_a_stage_is_passed_on_once_and_stops_the_runner(pipeline, capsys):
    stages = pipeline.stages

    def interrupted():  # Ctrl-C twice while warmup trains; it saves and exits 75
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        stages.exit_codes["warmup"] = EXIT_STOPPED

    stages.during["warmup"] = interrupted
    assert pipeline.run() == EXIT_STOPPED
    assert stages.sent == [("warmup", signal.SIGTERM)]  # once, as SIGTERM: a clean save
    assert stages.launched == ["warmup"]
    assert "stopped by signal 2 (SIGINT) during warmup (exit code 75)" in capsys.readouterr().out


def test_a_stage_stopped_by_a_signal_sent_to_it_directly_stops_the_runner(pipeline, capsys):
    stages = pipeline.stages
    stages.exit_codes["stable1"] = EXIT_STOPPED  # e.g. SLURM signalled the training processes only
    assert pipeline.run() == EXIT_STOPPED
    assert stages.launched == ["warmup", "stable1"] and not (pipeline.run_dir / "upcycle").exists()
    assert "stable1 was stopped by a signal sent to it (exit code 75)" in capsys.readouterr().out
    assert pipeline.run() == 0 and stages.launched[2:] == ["stable1"] + STAGES[3:]


def test_a_failed_stage_is_a_failure_not_a_stop(pipeline):
    pipeline.stages.exit_codes["warmup"] = 1
    with pytest.raises(runner.PipelineError, match="stage warmup failed \\(exit code 1\\)"):
        pipeline.run()


def test_torchrun_launch_passes_sigusr1_on_and_reports_stops(tmp_path):
    spec = load_pipeline("demo")
    stage = plan(spec, tmp_path, [])[0]
    command = stage_command(spec, stage, nproc=2)
    assert command[1:3] == ["-m", "ouro_train.pipeline.torchrun"]
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in command
    assert command[command.index("--shutdown-timeout=300") + 1 : command.index("--shutdown-timeout=300") + 3] == [
        "-m",
        "ouro_train.cli.train",
    ]
    assert Path(command[0]).name.startswith("python")
