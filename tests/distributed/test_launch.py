"""launch/torchrun.sh end to end: 2 CPU processes (ZeRO-1, data parallel 2) log the same
training as one process with the same global batch."""

import json
from pathlib import Path

import pytest
from cli_runs import TINY, run_cli

pytestmark = pytest.mark.slow  # torchrun on 2-3 processes

# The micro-batch (4 rows on one process, 2 on each of two) comes after, and wins.
COMMON = [*TINY, "train.steps=3"]


def losses(run_dir: Path) -> list[tuple[float, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"]) for r in records if "loss" in r]


def test_torchrun_data_parallel_matches_one_process(tmp_path):
    single = run_cli(tmp_path, f"run_dir={tmp_path / 'one'}", *COMMON, "train.micro_batch_size=4", check=False)
    assert single.returncode == 0, single.stderr
    launched = run_cli(
        tmp_path,
        f"run_dir={tmp_path / 'two'}",
        *COMMON,
        "train.micro_batch_size=2",
        "parallel.zero_stage=1",
        nproc=2,
        check=False,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "tensor parallel 1 x data parallel 2, ZeRO 1" in launched.stdout
    for (loss, norm), (ref_loss, ref_norm) in zip(losses(tmp_path / "two"), losses(tmp_path / "one"), strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-5)


def test_torchrun_with_a_world_size_tp_does_not_divide_fails_clearly(tmp_path):
    out = run_cli(tmp_path, f"run_dir={tmp_path}", "parallel.tensor_parallel=2", *COMMON, nproc=3, check=False)
    assert out.returncode != 0
    assert "tensor_parallel=2 does not divide the world size 3" in out.stdout + out.stderr
