"""Kill a training run at random moments and check that nothing is lost: prints one line per trial.

Each trial trains the tiny model on the demo data (a checkpoint every step, so that kills land
inside saves too), kills it with SIGKILL or SIGTERM at a random time, resumes it (same command),
repeats until the stage is finished, and compares with one uninterrupted run:
  * every step 1..N is in metrics.jsonl exactly once;
  * the losses are bitwise those of the uninterrupted run;
  * the exit status after a SIGTERM is 75 (stopped, resumable), 0 when finished.

    .venv/bin/python benchmarks/kill_soak.py --trials 10 --steps 12
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ouro_train.train.report import read_metrics

BIN = Path(sys.executable).parent
COMMON = [
    "train.micro_batch_size=2",
    "train.seq_len=32",
    "train.eval_batches=1",
    "model.vocab_size=512",
    "data.tokenizer_vocab_size=512",
    "logging.progress_bar=false",
    "schedule.warmup_steps=2",
    "checkpoint.every_steps=1",
    "checkpoint.keep_last=2",
]


def command(run: Path, steps: int, nproc: int, zero: int) -> list[str]:
    args = [*COMMON, f"run_dir={run}", f"train.steps={steps}", f"parallel.zero_stage={zero}"]
    if nproc == 1:
        return [str(BIN / "ouro-train"), *args]
    return [
        sys.executable,
        "-m",
        "ouro_train.pipeline.torchrun",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "-m",
        "ouro_train.cli.train",
        *args,
    ]


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl")[0]]


def trial(run: Path, steps: int, nproc: int, zero: int, rng: random.Random, env: dict) -> dict:
    kills, statuses = [], []
    for _ in range(20):  # kills, then the finishing run
        proc = subprocess.Popen(
            command(run, steps, nproc, zero),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        done = len(losses(run)) if (run / "metrics.jsonl").exists() else 0
        if len(kills) < 2 and done < steps - 1:
            # Past start-up, at a random step, at a random moment within it (saves included).
            target = rng.randint(done + 1, steps - 1)
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                if (run / "metrics.jsonl").exists() and len(losses(run)) >= target:
                    break
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))
            if proc.poll() is None:
                how = rng.choice([signal.SIGKILL, signal.SIGTERM])
                os.killpg(proc.pid, how)  # the whole process group, as a scheduler would
                kills.append(how.name)
        _, err = proc.communicate(timeout=600)
        statuses.append(proc.returncode)
        if proc.returncode == 0 and len(losses(run)) >= steps:
            break
        # 0 finished, 75 stopped by SIGTERM (saved), -9 killed; torchrun reports a killed worker as 1.
        if proc.returncode not in (0, 75, -9) + ((1,) if nproc > 1 else ()):
            return {"kills": kills, "statuses": statuses, "error": err[-800:]}
    return {"kills": kills, "statuses": statuses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--zero", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="ouro-kill-soak-"))
    env = os.environ | {"OURO_CACHE_DIR": str(root / "cache"), "WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu"}
    reference = root / "reference"
    subprocess.run(command(reference, args.steps, args.nproc, args.zero), env=env, check=True, capture_output=True)
    expected = losses(reference)
    good = 0
    for index in range(args.trials):
        run = root / f"trial{index}"
        result = trial(run, args.steps, args.nproc, args.zero, rng, env)
        got = losses(run)
        steps = [s for s, _ in got]
        once = steps == list(range(1, args.steps + 1))
        bitwise = got == expected
        ok = once and bitwise and "error" not in result
        good += ok
        print(
            f"trial {index}: kills {','.join(result['kills']) or '-'}; exit statuses {result['statuses']}; "
            f"steps once {once}; bitwise {bitwise}" + (f"; error {result['error']!r}" if "error" in result else ""),
            flush=True,
        )
    print(f"{good} of {args.trials} trials lost nothing ({args.nproc} process(es), ZeRO {args.zero}); in {root}")


if __name__ == "__main__":
    main()
