"""Stage hand-off: a stage that takes weights + optimizer + learning rate + data position from the
previous stage's final checkpoint continues exactly as one uninterrupted run; taking weights
only does not (so the equality is not vacuous); and on 2 ZeRO ranks the same hand-off works."""

import subprocess
from pathlib import Path

import pytest
from cli_runs import TINY, run_cli

from ouro_train.train.report import read_metrics

pytestmark = pytest.mark.slow  # CLI subprocesses, on 2 processes too

COMMON = [*TINY, "optim.lr=3e-3"]
CARRY = [
    "checkpoint.init_optimizer=true",
    "checkpoint.init_schedule=keep",
    "checkpoint.init_data_position=true",
]


def run(tmp: Path, name: str, *args: str, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli(tmp, *COMMON, f"run_dir={tmp / name}", *args, nproc=nproc, check=check)


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")[0]]


def test_weights_optimizer_schedule_and_data_hand_off_continue_one_run(tmp_path):
    run(tmp_path, "straight", "train.steps=8")
    run(tmp_path, "a", "train.steps=4")
    final = tmp_path / "a" / "checkpoints" / "step_00000004"
    assert (final / "optimizer.safetensors").is_file()
    b = run(tmp_path, "b", "train.steps=4", f"checkpoint.init_from={final}", "stage_name=b", *CARRY)
    assert "stage b starts from" in b.stdout and "optimizer" in b.stdout
    straight = losses(tmp_path / "straight")
    assert losses(tmp_path / "a") == straight[:4]
    assert losses(tmp_path / "b") == pytest.approx(straight[4:], rel=1e-6)

    # Weights only (fresh Adam, the data from the start): a different continuation.
    c = run(tmp_path, "c", "train.steps=4", f"checkpoint.init_from={final}")
    assert c.stdout.split("starts from")[-1].splitlines()[0].endswith(": weights")
    assert abs(losses(tmp_path / "c")[1] - straight[5]) > 1e-3


def test_hand_off_on_two_zero_ranks_matches_one_process(tmp_path):
    """The layout-free optimizer file: saved by 2 ZeRO-3 ranks, loaded by 2 ZeRO-1 and 2 ZeRO-3 ranks."""
    run(tmp_path, "straight", "train.steps=8")
    zero3 = ("parallel.zero_stage=3", "train.micro_batch_size=1")
    run(tmp_path, "a", "train.steps=4", *zero3, nproc=2)
    final = tmp_path / "a" / "checkpoints" / "step_00000004"
    zero1 = ("parallel.zero_stage=1", "train.micro_batch_size=1")
    run(tmp_path, "b", "train.steps=4", f"checkpoint.init_from={final}", *CARRY, *zero1, nproc=2)
    run(tmp_path, "c", "train.steps=4", f"checkpoint.init_from={final}", *CARRY, *zero3, nproc=2)
    straight = losses(tmp_path / "straight")
    assert losses(tmp_path / "b") == pytest.approx(straight[4:], rel=1e-5)
    assert losses(tmp_path / "c") == pytest.approx(straight[4:], rel=1e-5)


def test_missing_or_weights_only_inputs_fail_clearly(tmp_path):
    missing = run(tmp_path, "x", "train.steps=2", f"checkpoint.init_from={tmp_path / 'nope'}", check=False)
    assert (
        missing.returncode == 2
        and "checkpoint.init_from=" in missing.stderr
        and "no model.safetensors" in missing.stderr
    )
    no_lr = run(tmp_path, "a", "train.steps=2", "checkpoint.save_final=true")
    assert no_lr.returncode == 0
    final = tmp_path / "a" / "checkpoints" / "step_00000002"
    (final / "optimizer.safetensors").unlink()
    out = run(
        tmp_path, "y", "train.steps=2", f"checkpoint.init_from={final}", "checkpoint.init_optimizer=true", check=False
    )
    assert out.returncode == 2 and "optimizer.safetensors: missing" in out.stderr
    bad = run(tmp_path, "z", "train.steps=2", "checkpoint.init_optimizer=true", check=False)
    assert bad.returncode == 2 and "checkpoint.init_optimizer" in bad.stderr and "init_from" in bad.stderr


def test_sft_hands_its_weights_to_gate_training_which_changes_only_the_gate(tmp_path):
    """The last hand-off of the pipelines: stage=gate_training from a stage's final checkpoint,
    weights only (fresh optimizer, no optimizer.safetensors needed); its final weights are the
    input's bit for bit except the exit gate."""
    from safetensors.torch import load_file

    run(tmp_path, "sft", "train.steps=2")
    final = tmp_path / "sft" / "checkpoints" / "step_00000002"
    (final / "optimizer.safetensors").unlink()  # weights only: the gate stage must not need it
    gate = run(
        tmp_path,
        "gate",
        "stage=gate_training",
        "train.tokens=null",
        "train.global_batch_tokens=null",
        "train.steps=3",
        "schedule.warmup_steps=1",
        "train.seq_len=32",
        "train.micro_batch_size=2",
        "model.rope_theta=10000",
        f"checkpoint.init_from={final}",
    )
    assert f"stage gate_training starts from {final}: weights\n" in gate.stdout
    before = load_file(final / "model.safetensors")
    after = load_file(tmp_path / "gate" / "checkpoints" / "step_00000003" / "model.safetensors")
    assert set(before) == set(after)
    for name, value in before.items():
        changed = not (after[name] == value).all()
        assert changed == name.startswith("model.early_exit_gate."), name
