"""launch/torchrun.sh end to end: 2 CPU processes (ZeRO-1, data parallel 2) log the same
training as one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMON = [
    "train.steps=3",
    "train.seq_len=32",
    "train.eval_batches=1",
    "model.vocab_size=512",
    "data.tokenizer_vocab_size=512",
    "logging.progress_bar=false",
]


def losses(run_dir: Path) -> list[tuple[float, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"]) for r in records if "loss" in r]


def test_torchrun_data_parallel_matches_one_process(tmp_path):
    env = os.environ | {"OURO_CACHE_DIR": str(tmp_path), "PYTHON": sys.executable}
    single = subprocess.run(
        [
            str(Path(sys.executable).with_name("ouro-train")),
            f"run_dir={tmp_path / 'one'}",
            "train.micro_batch_size=4",
            *COMMON,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr
    launched = subprocess.run(
        [
            str(ROOT / "launch" / "torchrun.sh"),
            "2",
            f"run_dir={tmp_path / 'two'}",
            "train.micro_batch_size=2",
            "parallel.zero_stage=1",
            *COMMON,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "tensor parallel 1 x data parallel 2, ZeRO 1" in launched.stdout
    for (loss, norm), (ref_loss, ref_norm) in zip(losses(tmp_path / "two"), losses(tmp_path / "one"), strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-5)


def test_torchrun_with_a_world_size_tp_does_not_divide_fails_clearly(tmp_path):
    env = os.environ | {"OURO_CACHE_DIR": str(tmp_path), "PYTHON": sys.executable}
    out = subprocess.run(
        [str(ROOT / "launch" / "torchrun.sh"), "3", f"run_dir={tmp_path}", "parallel.tensor_parallel=2", *COMMON],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert "tensor_parallel=2 does not divide the world size 3" in out.stdout + out.stderr
