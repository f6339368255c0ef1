"""Checkpoints through the CLI: bitwise resume, and what a broken or foreign checkpoint does."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cli_runs import TINY, run_cli

pytestmark = pytest.mark.slow  # CLI subprocesses

COMMON = [*TINY, "train.steps=8", "schedule.kind=cosine", "schedule.warmup_steps=2"]


def ouro_train(tmp: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli(tmp, *COMMON, *args, check=check)


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_interrupted_run_resumes_bitwise_and_skips_when_done(tmp_path):
    ouro_train(tmp_path, f"run_dir={tmp_path / 'straight'}")
    first = ouro_train(tmp_path, f"run_dir={tmp_path / 'resumed'}", "train.max_steps_this_run=3")
    assert (tmp_path / "resumed" / "checkpoints" / "step_00000003" / "COMPLETE").is_file()
    assert "resumed from" not in first.stdout
    second = ouro_train(tmp_path, f"run_dir={tmp_path / 'resumed'}")
    assert "resumed from" in second.stdout and "at step 3" in second.stdout
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert list(resumed) == list(range(1, 9))
    assert resumed == straight  # bitwise: JSON keeps every digit of the float
    again = ouro_train(tmp_path, f"run_dir={tmp_path / 'resumed'}")
    assert "nothing to do" in again.stdout


def test_broken_newest_checkpoint_falls_back_and_config_change_is_refused(tmp_path):
    run = tmp_path / "run"
    # Checkpoints at steps 2 and 4 from one launch (checkpoint.* may change on resume).
    ouro_train(tmp_path, f"run_dir={run}", "train.max_steps_this_run=4", "checkpoint.every_steps=2")
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000004"
    # A save killed before its commit leaves only a temporary directory: never picked up.
    shutil.copytree(checkpoints / "step_00000004", checkpoints / ".tmp-step_00000005")
    (checkpoints / "step_00000004" / "COMPLETE").unlink()  # and the newest is broken
    out = ouro_train(tmp_path, f"run_dir={run}", "train.max_steps_this_run=1")
    assert "resumed from" in out.stdout and "step_00000002 at step 2" in out.stdout
    changed = ouro_train(tmp_path, f"run_dir={run}", "optim.lr=1e-3", check=False)
    assert changed.returncode == 2 and "training config changed" in changed.stderr and "optim.lr" in changed.stderr
    engine = checkpoints / "step_00000003" / "engine" / "engine.pt"
    engine.write_bytes(engine.read_bytes()[:100])
    truncated = ouro_train(tmp_path, f"run_dir={run}", "checkpoint.resume=" + str(engine.parent.parent), check=False)
    assert truncated.returncode == 2 and "engine.pt is truncated" in truncated.stderr
    assert "Traceback" not in truncated.stderr
    # resume=auto passes over the truncated newest checkpoint, saying which, as the README says.
    fallback = ouro_train(tmp_path, f"run_dir={run}", "train.max_steps_this_run=1")
    assert f"skipping checkpoint {checkpoints / 'step_00000003'}" in fallback.stderr
    assert "step_00000002 at step 2" in fallback.stdout


def test_raising_train_steps_continues_a_finished_run(tmp_path):
    run = f"run_dir={tmp_path / 'run'}"
    ouro_train(tmp_path, run, "train.steps=4", "schedule.kind=constant")
    longer = ouro_train(tmp_path, run, "train.steps=6", "schedule.kind=constant")
    assert "extending the run: train.steps 4 -> 6" in longer.stdout and "at step 4" in longer.stdout
    assert list(losses(tmp_path / "run")) == list(range(1, 7))
    assert (tmp_path / "run" / "checkpoints" / "step_00000006" / "COMPLETE").is_file()
