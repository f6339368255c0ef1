import json
import signal
import subprocess

import pytest
from cli_runs import TINY, logged_lines, run_cli, start_cli, wait_until

pytestmark = pytest.mark.slow  # a CLI subprocess


def test_sigusr1_stops_training_cleanly_at_a_step_boundary(tmp_path):
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    proc = start_cli(tmp_path, f"run_dir={tmp_path / 'run'}", *TINY, "train.steps=5000", **pipes)
    metrics = tmp_path / "run" / "metrics.jsonl"
    wait_until(lambda: logged_lines(metrics) >= 3, "3 logged steps", proc)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err  # EXIT_STOPPED: stopped, resumable (0 means finished)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert 3 <= steps[-1] < 5000 and steps == list(range(1, steps[-1] + 1))  # whole steps only
    assert f"stopped by signal {int(signal.SIGUSR1)} after step {steps[-1]}" in out


def test_ctrl_c_saves_exits_75_and_the_same_command_resumes_at_the_next_step(tmp_path):
    """A newcomer's Ctrl-C loses nothing: SIGINT is a stop like SIGTERM (no checkpoint interval
    configured: the stop saves anyway), and the same command continues with every step logged once."""
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    args = [f"run_dir={tmp_path / 'run'}", *TINY, "train.steps=5000"]
    proc = start_cli(tmp_path, *args, **pipes)
    metrics = tmp_path / "run" / "metrics.jsonl"
    wait_until(lambda: logged_lines(metrics) >= 3, "3 logged steps", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "Ctrl-C: stopping at the end of this step and saving a checkpoint" in err
    stopped = [json.loads(line)["step"] for line in metrics.read_text().splitlines()][-1]
    assert f"stopped by signal {int(signal.SIGINT)} after step {stopped}" in out
    assert "run the same command again to resume" in out
    # Logs made for clusters: no TTY here, so no progress bar frames even when it is asked for; each
    # line says the pace and what is left; an end-of-run summary names the final checkpoint.
    again = run_cli(tmp_path, *args, "train.max_steps_this_run=2", "logging.progress_bar=true", "train.log_every=1")
    assert f"at step {stopped}" in again.stdout and "\r" not in again.stdout + again.stderr
    line = next(x for x in again.stdout.splitlines() if x.startswith(f"step {stopped + 1} |"))
    assert " tok/s | " in line and "TFLOP/s" in line and " GiB | " in line and "ETA " in line and "/5000)" in line
    assert f"done: stage main, step {stopped + 2}; this launch 2 steps" in again.stdout
    config = tmp_path / "run" / "config.yaml"
    assert f"config ({config}):" in again.stdout and "--- end of config" in again.stdout  # printed once, saved
    assert again.stdout.count("--- end of config") == 1 and "train:" in config.read_text()
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "loss" in json.loads(line)]
    assert steps == list(range(1, stopped + 3))  # every step once, the resumed ones after the stop


def test_a_second_ctrl_c_aborts():
    from ouro_train.train.signals import StopOnSignal

    with StopOnSignal() as signals:
        signal.raise_signal(signal.SIGINT)
        assert signals.requested == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
