"""Recovering from a divergence through the CLI, as the exit-3 message says (checkpoint/rollback.py):
an absurd learning rate (optim.lr=1e6) is stopped before any of its updates lands, the run exits 3
printing the rollback command, and that command, run as printed, trains on from the checkpoint
at a sane loss with the lower rate; run again (a requeue) it continues the rolled-back run; the
plain command then resumes at the rolled-back rate, passing over a checkpoint whose RNG file was
replaced by a hostile pickle (with a warning naming the file)."""

import json
import shlex
from pathlib import Path

import pytest
from cli_runs import TINY, run_cli
from hostile_pickles import hostile_pickle, replace_pickle

pytestmark = pytest.mark.slow  # CLI subprocesses

COMMON = [*TINY, "train.steps=30", "checkpoint.every_steps=1", "checkpoint.keep_last=2", "checkpoint.keep_every=4"]


def records(run: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "loss" in r and "eval/loss" not in r}


def train_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "train_state.json").read_text())


def test_the_printed_rollback_command_recovers_a_run_that_diverged(tmp_path):
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    diverged = run_cli(tmp_path, *COMMON, f"run_dir={run}", "optim.lr=1e6", check=False)
    assert diverged.returncode == 3, diverged.stderr[-3000:]
    assert "Traceback" not in diverged.stderr
    assert "update too large" in diverged.stderr and "the weights are those of step 0" in diverged.stderr
    # Every update was refused before it landed: the kept checkpoints hold the initial weights.
    assert [p.name for p in sorted(checkpoints.glob("step_*"))] == ["step_00000003", "step_00000004"]
    assert train_state(checkpoints / "step_00000004")["health"]["weights_of_step"] == 0
    command = next(line.strip() for line in diverged.stderr.splitlines() if line.strip().startswith("ouro-train "))
    assert f"checkpoint.resume={checkpoints / 'step_00000004'}" in command
    args = shlex.split(command)[1:]
    lr = float(next(a for a in args if a.startswith("checkpoint.rollback_lr=")).split("=")[1])
    assert 1e-4 < lr < 1e-2

    rolled = run_cli(tmp_path, *args, "train.max_steps_this_run=4")
    assert "rolled back to step_00000004 (step 4): peak learning rate 1e+06 -> " in rolled.stdout
    seen = records(run)
    assert sorted(seen) == list(range(1, 9))  # steps 5-8 replaced the diverged run's step 5
    assert seen[5]["rollback_from_step"] == 4 and seen[5]["rollback_lr"] == lr and "rollback_lr" not in seen[6]
    assert all(seen[s]["skipped"] == 0 and seen[s]["lr"] == lr for s in range(5, 9))
    assert seen[8]["loss"] < seen[4]["loss"]  # trains at a sane loss (the diverged weights read 1e13)
    state = train_state(checkpoints / "step_00000008")
    assert state["health"]["healthy"] and state["health"]["weights_of_step"] == 8
    assert [(r["from_step"], r["lr"], r["previous_lr"]) for r in state["rollbacks"]] == [(4, lr, 1e6)]

    # The same command again (a requeued job, a resume after Ctrl-C) continues the rolled-back run.
    again = run_cli(tmp_path, *args, "train.max_steps_this_run=1")
    assert "this rollback was made before and the run went on from it" in again.stdout
    assert "at step 8" in again.stdout and sorted(records(run)) == list(range(1, 10))
    assert train_state(checkpoints / "step_00000009")["rollbacks"] == state["rollbacks"]

    # The plain command (optim.lr=1e6 as before) continues at the rolled-back rate, passing over
    # the newest checkpoint, whose RNG file a hostile pickle replaced.
    rng = checkpoints / "step_00000009" / "rng" / "rank_00000.pt"
    replace_pickle(rng, hostile_pickle("global", "top_level", tmp_path / "ran"))
    plain = run_cli(tmp_path, *COMMON, f"run_dir={run}", "optim.lr=1e6", "train.max_steps_this_run=1")
    assert f"skipping checkpoint {checkpoints / 'step_00000009'}: {rng}: refused" in plain.stderr
    assert "resumed from" in plain.stdout and "step_00000008 at step 8" in plain.stdout
    assert records(run)[9]["lr"] == lr and not (tmp_path / "ran").exists()
