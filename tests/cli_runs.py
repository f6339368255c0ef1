"""The CLIs as a user runs them, at tiny sizes: what the integration, distributed and SLURM-signal
tests share (the console scripts of this venv, launch/torchrun.sh, the tiny-run overrides)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = ROOT / "launch" / "torchrun.sh"

# A run that takes seconds on CPU: the demo tokenizer at 512 tokens, 2 rows of 32 tokens per
# micro-batch, one evaluation batch, no progress bar in the captured output.
TINY = [
    "train.micro_batch_size=2",
    "train.seq_len=32",
    "train.eval_batches=1",
    "model.vocab_size=512",
    "data.tokenizer_vocab_size=512",
    "logging.progress_bar=false",
    # matplotlib's import and the plot cost ~2 s per run; tests of the plot turn it on.
    "logging.plot=false",
    # wandb's import and its service process cost ~5 s per run; the tests that check the wandb
    # integration (the demo pipeline's sft stage, the SIGTERM-to-wandb-service test) turn it on.
    "logging.wandb=false",
]


def cli_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a CLI run: its data cache under tmp (tests never share one), this
    interpreter for launch/torchrun.sh, wandb offline."""
    own = {"OURO_CACHE_DIR": str(tmp / "cache"), "PYTHON": sys.executable, "WANDB_MODE": "offline"}
    return os.environ | own | extra


def cli_command(nproc: int = 1, program: str = "ouro-train") -> list[str]:
    """`program` from this venv; for nproc > 1 ouro-train on that many processes (launch/torchrun.sh)."""
    return [str(BIN / program)] if nproc == 1 else [str(TORCHRUN), str(nproc)]


def run_cli(
    tmp: Path,
    *args: str,
    program: str = "ouro-train",
    nproc: int = 1,
    check: bool = True,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess:
    """Run it to the end, output captured; `check`: fail the test (with the output's tail) unless it exits 0."""
    done = subprocess.run(
        [*cli_command(nproc, program), *args],
        capture_output=True,
        text=True,
        env=cli_env(tmp, **(env or {})),
        timeout=timeout,
    )
    if check:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def start_cli(tmp: Path, *args: str, nproc: int = 1, **popen) -> subprocess.Popen:
    """Start it in the background (a test that signals it while it trains)."""
    return subprocess.Popen([*cli_command(nproc), *args], env=cli_env(tmp), **popen)


def wait_until(
    condition: Callable[[], bool], what: str, proc: subprocess.Popen | None = None, timeout: float = 180
) -> None:
    """Return as soon as `condition()` holds (checked every 50 ms). Fail naming `what` when `proc`
    exits first, or after `timeout` s: only a bound for a hung run, nothing waits that long."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            output = proc.communicate()[1][-3000:] if proc.stderr else ""
            raise AssertionError(f"waiting for {what}: the process exited first ({proc.returncode})\n{output}")
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def logged_lines(metrics: Path) -> int:
    """Lines in a run's metrics.jsonl so far (0 before it exists): one per logged step."""
    return metrics.read_text().count("\n") if metrics.exists() else 0
