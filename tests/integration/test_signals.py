import json
import signal
import subprocess

import pytest
from cli_runs import TINY, logged_lines, start_cli, wait_until

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
