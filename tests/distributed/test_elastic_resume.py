"""Resume at another world size: a ZeRO checkpoint written by 2 processes continues on 1 and on 4
(and at another ZeRO stage) with the same global batches, through DeepSpeed's universal checkpoint.

The resumed runs see the same rows in every optimizer step (the loader position is global and
train.global_batch_size fixes the rows per step; accumulation is derived). They differ from the
uninterrupted run only in the order of float32 sums (other all-reduce and accumulation splits),
which we measured at 1e-7 relative over 3 steps; a lost optimizer state or a shifted data
order moves the loss by more than 1e-3.
"""

import subprocess
from pathlib import Path

import pytest
from cli_runs import TINY, run_cli

from ouro_train.train.report import read_metrics

pytestmark = pytest.mark.slow  # torchrun on 1-4 processes

COMMON = [*TINY, "train.steps=6", "train.global_batch_size=8", "optim.lr=3e-3", "checkpoint.every_steps=3"]


def launch(nproc: int, run_dir: Path, tmp: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli(tmp, f"run_dir={run_dir}", *COMMON, *overrides, nproc=nproc, check=check)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")[0]}


@pytest.mark.parametrize("zero, resumes", [(1, [(1, 1), (4, 2)]), (3, [(1, 3)])])
def test_zero_checkpoint_resumes_on_one_and_four_processes(tmp_path, zero, resumes):
    """(processes, ZeRO stage) of each resume: ZeRO-1 on 1 process (accumulation 4), then on 4
    (accumulation 1) at stage 2, which reuses the first resume's conversion; ZeRO-3 on 1 process
    (ZeRO-3 shards convert to ZeRO-3 only)."""
    straight = launch(2, tmp_path / "straight", tmp_path, f"parallel.zero_stage={zero}")
    assert "ZeRO" in straight.stdout
    # Its step-3 checkpoint (every_steps=3, keep_last=2) is what a run cut after step 3 leaves.
    checkpoint = tmp_path / "straight" / "checkpoints" / "step_00000003"
    assert checkpoint.is_dir()
    expected = losses(tmp_path / "straight")
    for index, (nproc, stage) in enumerate(resumes):
        run = tmp_path / f"resume{index}"
        out = launch(nproc, run, tmp_path, f"parallel.zero_stage={stage}", f"checkpoint.resume={checkpoint}")
        if index == 0:
            assert "converted" in out.stdout and "universal" in out.stdout
        else:
            assert "converted" not in out.stdout, "the universal conversion is cached in the checkpoint"
        got = losses(run)
        assert sorted(got) == [4, 5, 6], (nproc, stage)
        for step in (4, 5, 6):
            assert got[step] == pytest.approx(expected[step], rel=1e-5), (nproc, stage, step, got, expected)


def test_zero_0_and_single_process_checkpoints(tmp_path):
    """Without ZeRO the optimizer is whole on every rank: 2 processes -> 1 loads it directly (on a
    one-process DeepSpeed engine). A single-process (local engine) checkpoint is refused on 2
    processes with the way out named."""
    launch(2, tmp_path / "straight", tmp_path)
    checkpoint = tmp_path / "straight" / "checkpoints" / "step_00000003"
    launch(1, tmp_path / "one", tmp_path, f"checkpoint.resume={checkpoint}")
    expected, got = losses(tmp_path / "straight"), losses(tmp_path / "one")
    assert [got[s] for s in (4, 5, 6)] == pytest.approx([expected[s] for s in (4, 5, 6)], rel=1e-5)

    launch(1, tmp_path / "local", tmp_path, "train.max_steps_this_run=3")
    local = tmp_path / "local" / "checkpoints" / "step_00000003"
    refused = launch(2, tmp_path / "two", tmp_path, f"checkpoint.resume={local}", check=False)
    assert refused.returncode != 0
    assert "single-process engine" in refused.stderr and "checkpoint.init_from" in refused.stderr
