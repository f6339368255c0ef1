"""The demo pipeline end to end at its smallest size: every stage (with the upcycle and SFT),
skipping finished stages, resuming a stage cut mid-way, a SIGTERM between/inside stages, the
report, and a stage whose input checkpoint is missing."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runs import wait_until

from ouro_train.train.report import read_metrics
from ouro_train.train.signals import EXIT_STOPPED

pytestmark = pytest.mark.slow  # the demo pipeline's CLI, every stage

BIN = Path(sys.executable).parent
SMALL = [
    # 4 steps of 1,024 tokens in every stage (one row of 1,024, two of 512 or four of 256).
    "train.tokens=4096",
    "train.global_batch_tokens=1024",
    "train.micro_batch_size=1",
    "train.eval_batches=1",
    "checkpoint.every_steps=1",
    "warmup:schedule.warmup_steps=2",
    "sft:schedule.warmup_steps=1",
    "logging.wandb=false",  # ~5 s per stage run; sft checks the wandb integration
    "sft:logging.wandb=true",
    "eval:documents=3",
    "eval:max_tokens=40",
]


def pipeline(tmp: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [str(BIN / "ouro-pipeline"), "pipeline=demo", f"run_dir={tmp / 'run'}", *SMALL, *args],
        capture_output=True,
        text=True,
        env=_env(tmp),
    )
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _env(tmp: Path) -> dict:
    return os.environ | {"OURO_CACHE_DIR": str(tmp / "cache"), "WANDB_MODE": "offline"}


def steps_logged(stage_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(stage_dir / "metrics.jsonl")[0]]


def test_demo_pipeline_runs_every_stage_skips_and_resumes(tmp_path):
    run = tmp_path / "run"
    first = pipeline(tmp_path, "stop_after=upcycle")
    for stage in ("warmup", "stable1"):
        assert f"[pipeline] {stage}: starting" in first.stdout
    assert "1 layers x 8 -> 2 x 4 (stack, moments duplicate)" in first.stdout
    assert (run / "upcycle" / "optimizer.safetensors").is_file()
    assert not (run / "stable2").exists()

    # A stable2 run cut after one step (as a crash would leave it), then the whole pipeline again.
    from ouro_train.pipeline.commands import stage_command
    from ouro_train.pipeline.plan import plan
    from ouro_train.pipeline.spec import load_pipeline

    spec = load_pipeline("demo")
    stage = next(p for p in plan(spec, run, SMALL) if p.spec.name == "stable2")
    cut = subprocess.run(
        [*stage_command(spec, stage, 1), "train.max_steps_this_run=1"],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
    )
    assert cut.returncode == 0, cut.stderr[-2000:]
    assert steps_logged(run / "stable2") == [1]

    # SIGTERM while stages run: the running stage saves and the runner stops (75), resumable.
    runner = subprocess.Popen(
        [str(BIN / "ouro-pipeline"), "pipeline=demo", f"run_dir={run}", *SMALL],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(tmp_path),
    )
    wait_until((run / "ct_anneal" / "metrics.jsonl").is_file, "the ct_anneal stage's first step", runner)
    runner.send_signal(signal.SIGTERM)
    output = runner.communicate(timeout=120)[0]
    assert runner.returncode == EXIT_STOPPED == 75, output[-3000:]
    assert "[pipeline] warmup: finished earlier" in output and "[pipeline] stable2: resuming" in output
    assert "stopped by signal" in output

    done = pipeline(tmp_path)
    assert "[pipeline] stable2: finished earlier" in done.stdout
    assert "[pipeline] done: 10 stages" in done.stdout
    for name in ("warmup", "stable1", "stable2", "ct_anneal", "longct", "midtrain", "sft", "gate_training"):
        steps = steps_logged(run / name)
        assert steps == list(range(1, len(steps) + 1)) and steps, (name, steps)  # no step lost or doubled
        assert (run / name / "final_eval.json").is_file()
    report = (run / "report.md").read_text()
    assert "| sft | 2 layers x 4 |" in report and "upcycle (stack" in report
    assert (run / "loss_per_step.png").stat().st_size > 10_000
    # The eval stage: ouro-eval of gate_training's final checkpoint, its plot in the report.
    evaluation = json.loads((run / "eval" / "eval.json").read_text())
    assert evaluation["documents"] == 3 and evaluation["source"]["model"].endswith("step_00000004")
    assert [r["exit"] for r in evaluation["runs"]][:2] == ["all", "q:0.3"]
    assert "](eval/eval.png)" in report and (run / "eval" / "eval.png").stat().st_size > 10_000
    assert list((run / "sft" / "wandb").glob("offline-run-*"))

    again = pipeline(tmp_path)
    assert again.stdout.count("finished earlier") == 10


def test_a_stage_whose_input_is_missing_fails_clearly(tmp_path):
    out = pipeline(tmp_path, "start_at=ct_anneal", check=False)
    assert out.returncode == 2
    assert "stage ct_anneal starts from" in out.stderr and "stable2/checkpoints" in out.stderr
    assert "start_at=" in out.stderr
    bad = pipeline(tmp_path, "start_at=nope", check=False)
    assert bad.returncode == 2 and "start_at=nope: no such stage" in bad.stderr


def test_stages_run_on_two_processes_with_torchrun(tmp_path):
    """nproc=2: each stage runs under torchrun (ZeRO-1, data parallel 2), hand-off included."""
    out = pipeline(
        tmp_path,
        "nproc=2",
        "parallel.zero_stage=1",
        "train.micro_batch_size=2",
        "checkpoint.every_steps=0",
        "stop_after=stable1",
    )
    assert out.stdout.count("tensor parallel 1 x data parallel 2, ZeRO 1") == 2
    run = tmp_path / "run"
    for name in ("warmup", "stable1"):
        assert (run / name / "final_eval.json").is_file()
    state = json.loads((run / "stable1" / "checkpoints" / "step_00000004" / "train_state.json").read_text())
    assert state["world_size"] == 2 and state["final"] is True
