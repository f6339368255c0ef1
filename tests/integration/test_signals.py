import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def test_sigusr1_stops_training_cleanly_at_a_step_boundary(tmp_path):
    env = os.environ | {"OURO_CACHE_DIR": str(tmp_path)}
    cmd = [
        str(Path(sys.executable).with_name("ouro-train")),
        f"run_dir={tmp_path / 'run'}",
        "train.steps=5000",
        "train.micro_batch_size=2",
        "train.seq_len=32",
        "model.vocab_size=512",
        "data.tokenizer_vocab_size=512",
        "logging.progress_bar=false",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err  # EXIT_STOPPED: stopped, resumable (0 means finished)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert 3 <= steps[-1] < 5000 and steps == list(range(1, steps[-1] + 1))  # whole steps only
    assert f"stopped by signal {int(signal.SIGUSR1)} after step {steps[-1]}" in out
