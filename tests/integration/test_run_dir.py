"""The run directory as the single source of truth: every step logged exactly once whatever is
killed when, torn metrics lines, one writer at a time, a full disk, a run_dir that is a file,
a diverging run (exit 3, the last finite checkpoint kept) and the exit status of a signal stop."""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from cli_runs import TINY, logged_lines, run_cli, start_cli, wait_until
from safetensors.torch import load_file

from ouro_train.train.report import read_metrics

pytestmark = pytest.mark.slow  # CLI subprocesses and whole training runs in process

COMMON = [*TINY, "logging.wandb=false", "schedule.warmup_steps=1"]
# A learning rate at which the run diverges, a checkpoint after every step, only one kept.
DIVERGING = ["train.steps=40", "optim.lr=1e6", "checkpoint.every_steps=1", "checkpoint.keep_last=1"]


def ouro_train(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli(tmp, *COMMON, *args, check=False)


def logged_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run / "metrics.jsonl")[0]]


def in_process(tmp: Path, run: Path, *overrides: str):
    """What the CLI runs (run_stage) in this process, so that a test can stop it at an exact point."""
    from ouro_train.config.store import compose_config
    from ouro_train.train.stage import run_stage

    os.environ["OURO_CACHE_DIR"] = str(tmp / "cache")
    return run_stage(compose_config([*COMMON, f"run_dir={run}", *overrides]))


class Killed(BaseException):
    """Stands for SIGKILL: nothing after the point where it is raised runs."""


@pytest.mark.parametrize("when", ["after_commit", "before_commit"])
def test_a_kill_around_a_checkpoint_commit_leaves_every_step_logged_once(tmp_path, monkeypatch, when):
    import ouro_train.checkpoint.manager as manager

    real_commit = manager.commit

    def commit(root, tmp, step):
        if step == 3 and when == "before_commit":
            raise Killed
        real_commit(root, tmp, step)
        if step == 3:
            raise Killed

    run = tmp_path / "run"
    monkeypatch.setattr(manager, "commit", commit)
    with pytest.raises(Killed):
        in_process(tmp_path, run, "train.steps=5", "checkpoint.every_steps=1")
    # Step 3 is logged whichever side of the commit the kill fell on (its line is written first).
    assert logged_steps(run) == [1, 2, 3]
    monkeypatch.setattr(manager, "commit", real_commit)
    in_process(tmp_path, run, "train.steps=5", "checkpoint.every_steps=1")
    assert logged_steps(run) == [1, 2, 3, 4, 5]


def test_a_torn_metrics_line_is_dropped_with_a_warning_and_the_run_resumes(tmp_path):
    run = tmp_path / "run"
    first = ouro_train(tmp_path, f"run_dir={run}", "train.steps=4", "train.max_steps_this_run=2")
    assert first.returncode == 0, first.stderr[-2000:]
    torn = len((run / "metrics.jsonl").read_text().splitlines()) + 1
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 4.1')  # a kill or a full disk mid-write
    second = ouro_train(tmp_path, f"run_dir={run}", "train.steps=4")
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"{run / 'metrics.jsonl'}: dropped 1 unreadable line(s) ({torn})" in second.stderr
    assert logged_steps(run) == [1, 2, 3, 4]


def test_signal_stop_exits_75_and_a_second_writer_is_refused(tmp_path):
    run = tmp_path / "run"
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    first = start_cli(tmp_path, *COMMON, f"run_dir={run}", "train.steps=5000", **pipes)
    try:
        wait_until(lambda: logged_lines(run / "metrics.jsonl") >= 2, "2 logged steps", first)
        second = ouro_train(tmp_path, f"run_dir={run}", "train.steps=5000")
        assert second.returncode == 2
        assert f"in use by another run (pid {first.pid} on " in second.stderr and "run.lock" in second.stderr
        assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 75, err[-2000:]
    assert "exit status 75: run the same command again to resume" in out
    assert not (run / "run.lock").exists()  # released on the way out
    # A lock left by a process that is gone (here: a pid that does not exist on this host) is taken over.
    import socket

    stale = {"host": socket.gethostname(), "pid": 2**22 + 12345, "since": "yesterday"}
    (run / "run.lock").write_text(json.dumps(stale))
    last = logged_steps(run)[-1]
    resumed = ouro_train(tmp_path, f"run_dir={run}", "train.steps=5000", "train.max_steps_this_run=1")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"taking over the lock of pid {2**22 + 12345}" in resumed.stdout and "is not running" in resumed.stdout
    assert logged_steps(run) == list(range(1, last + 2))


def test_a_run_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a run directory")
    for run_dir in (path, path / "sub"):
        out = ouro_train(tmp_path, f"run_dir={run_dir}", "train.steps=1")
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert f"{path} is a file" in out.stderr or f"run_dir={path}: is a file" in out.stderr


def test_a_diverging_run_stops_with_status_3_and_keeps_its_last_finite_checkpoint(tmp_path):
    run = tmp_path / "run"
    out = ouro_train(tmp_path, f"run_dir={run}", *DIVERGING, "guard.max_consecutive_bad=4")
    assert out.returncode == 3, out.stderr[-2000:]
    assert "training diverged: 4 bad steps in a row" in out.stderr and "Traceback" not in out.stderr
    records = read_metrics(run / "metrics.jsonl")[0]
    assert [r["skipped"] for r in records][-4:] == [1, 1, 1, 1] and records[-1]["guard/skipped_steps"] >= 4
    checkpoints = sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert checkpoints, "no checkpoint kept"
    for checkpoint in checkpoints:  # every checkpoint on disk holds finite weights
        weights = load_file(str(checkpoint / "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values()), checkpoint
    states = [json.loads((c / "train_state.json").read_text()) for c in checkpoints]
    assert any(s["healthy"] for s in states)  # the newest healthy one survived keep_last=1
    assert not (run / "final_eval.json").exists()
    # The counters survive a resume (here with a more patient guard: guard.* may change on resume).
    saved = states[-1]["guard"]["counts"]
    again = ouro_train(
        tmp_path, f"run_dir={run}", *DIVERGING, "guard.max_consecutive_bad=100", "train.max_steps_this_run=1"
    )
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = read_metrics(run / "metrics.jsonl")[0][-1]
    assert resumed["step"] == states[-1]["step"] + 1 and resumed["skipped"] == 1
    assert resumed["guard/skipped_steps"] == sum(saved.values()) + 1


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        # A real full disk needs a small file system; only root can mount one (CI runs as root).
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}): needs root")


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "14m")  # one tiny-model checkpoint (~10 MB) fits, two do not
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_fails_the_save_clearly_and_keeps_the_previous_checkpoint(tmp_path, small_disk, monkeypatch):
    run = small_disk / "run"
    out = ouro_train(tmp_path, f"run_dir={run}", "train.steps=6", "checkpoint.every_steps=2")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "not enough free space to save the checkpoint of step 4" in out.stderr and "GiB are free" in out.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000002"]

    # Past the free-space check (another writer filled the disk meanwhile): the write itself fails.
    import ouro_train.checkpoint.manager as manager

    monkeypatch.setattr(manager, "check_free_space", lambda *a: None)
    from ouro_train.checkpoint.errors import CheckpointError

    with pytest.raises(CheckpointError, match="the disk filled up while saving the checkpoint of step 4"):
        in_process(tmp_path, run, "train.steps=6", "checkpoint.every_steps=2")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    # And the kept checkpoint resumes once there is room.
    monkeypatch.undo()
    resumed = ouro_train(
        tmp_path,
        f"run_dir={run}",
        "train.steps=6",
        "checkpoint.every_steps=2",
        "checkpoint.save_final=false",
        "train.max_steps_this_run=1",
    )
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout and "at step 2" in resumed.stdout


def test_a_signal_during_start_up_or_the_final_save_is_never_fatal(tmp_path, monkeypatch):
    import signal as signals

    import ouro_train.checkpoint.manager as manager
    import ouro_train.parallel as parallel
    from ouro_train.train.stage import StoppedBySignal

    real_save, real_init = manager.Checkpointer.save, parallel.init_parallel

    def save(self, trainer, loader_state, final=False):
        if final:
            signals.raise_signal(signals.SIGTERM)  # arrives while the final checkpoint is written
        return real_save(self, trainer, loader_state, final=final)

    monkeypatch.setattr(manager.Checkpointer, "save", save)
    run = tmp_path / "run"
    in_process(tmp_path, run, "train.steps=3")
    state = json.loads((run / "checkpoints" / "step_00000003" / "train_state.json").read_text())
    assert state["final"] and logged_steps(run) == [1, 2, 3]  # the stage finished

    def init(*args, **kwargs):
        signals.raise_signal(signals.SIGUSR1)  # arrives during start-up
        return real_init(*args, **kwargs)

    monkeypatch.setattr(parallel, "init_parallel", init)
    with pytest.raises(StoppedBySignal):  # stops at the first step boundary, with a checkpoint
        in_process(tmp_path, tmp_path / "early", "train.steps=3")
    assert logged_steps(tmp_path / "early") == [1]
    assert (tmp_path / "early" / "checkpoints" / "step_00000001" / "COMPLETE").is_file()
