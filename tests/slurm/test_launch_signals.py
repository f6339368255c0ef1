"""Signals as SLURM delivers them, without a cluster (part of `make test`):

- SLURM's TERM reaches every process of a job step, wandb's service process under rank 0 too; the
  trainer must still save its checkpoint (wandb's next log raises ConnectionResetError).
- USR1 to torchrun (what srun passes on from the batch script) must reach the workers, which save
  and stop, instead of killing torchrun at once and leaving them training.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_runs import TINY, logged_lines, start_cli, wait_until

pytestmark = pytest.mark.slow  # CLI subprocesses and torchrun

ENDLESS = [*TINY, "train.steps=100000"]


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_for_steps(metrics: Path, count: int, proc: subprocess.Popen) -> None:
    wait_until(lambda: logged_lines(metrics) >= count, f"{count} steps in {metrics}", proc)


def newest_checkpoint_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))


def last_logged_step(run_dir: Path) -> int:
    from ouro_train.train.report import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")[0][-1]["step"]


def test_term_to_the_trainer_and_its_wandb_service_still_saves(tmp_path):
    run_dir = tmp_path / "run"
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    proc = start_cli(tmp_path, f"run_dir={run_dir}", *ENDLESS, "logging.wandb=true", **pipes)
    try:
        wait_for_steps(run_dir / "metrics.jsonl", 3, proc)
        service = [pid for pid in children(proc.pid) if "wandb-core" in command_line(pid)]
        assert service, "no wandb service process under the trainer"
        for pid in [proc.pid, *service]:  # as SLURM does: every process of the step at once
            os.kill(pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (0, 75), err[-3000:]
    assert "warning: wandb" in err and "continuing without wandb" in err
    assert "Traceback" not in err
    assert f"stopped by signal {int(signal.SIGTERM)} after step" in out
    assert newest_checkpoint_step(run_dir) == last_logged_step(run_dir) >= 3


def test_usr1_to_torchrun_reaches_the_workers_which_save_and_stop(tmp_path):
    run_dir = tmp_path / "run"
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        wandb_off = "logging.wandb=false"
        proc = start_cli(tmp_path, f"run_dir={run_dir}", wandb_off, *ENDLESS, nproc=2, stdout=stdout, stderr=stderr)
    workers: list[int] = []
    try:
        wait_for_steps(run_dir / "metrics.jsonl", 3, proc)
        # torchrun.sh execs torchrun, whose children are the training processes.
        workers = [pid for pid in children(proc.pid) if "ouro_train.cli.train" in command_line(pid)]
        assert len(workers) == 2
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=120)
        deadline = time.monotonic() + 30
        while any(command_line(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for pid in workers if command_line(pid)]
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in workers:  # what an old torchrun left behind
            if command_line(pid):
                os.kill(pid, signal.SIGKILL)
    # Without --signals-to-handle torchrun died of USR1 at once (status 138) and the workers
    # trained on; with it, torchrun passes USR1 on, waits for them, then exits 1 (SignalException).
    assert proc.returncode not in (-signal.SIGUSR1, 128 + signal.SIGUSR1), f"torchrun died of USR1 ({proc.returncode})"
    assert not left, f"training processes {left} still running after torchrun exited"
    assert f"stopped by signal {int(signal.SIGUSR1)} after step" in out.read_text()
    assert newest_checkpoint_step(run_dir) == last_logged_step(run_dir) >= 3
