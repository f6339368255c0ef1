"""The real trainer end to end: `ouro-train` under `launch/torchrun.sh`, a save, and a resume in a
fresh launch that must continue exactly; prints the trainer's own tokens/s (to set beside
`bench_mfu.py` at the same settings).

Launch A trains `--steps` steps and checkpoints once, just past halfway (checkpoint.every_steps, no
final save), and profiles steps 3-4 (`--profile-steps`: logging.profile_start, the breakdown
printed: device time by kind, idle, the host's time per phase of the step); launch B, in another run
directory, resumes from that checkpoint and trains the rest, saving nothing. Every loss and gradient
norm of B must equal A's bit for bit; exit status 1 otherwise. One checkpoint at a time, removed at
the end (unless --keep): Ouro-1.4B's ZeRO-1 checkpoint is 26.7 GiB, and the GPU machine's disk 64
GB.

    # on a GPU (gpu_check.sh run --train): Ouro-1.4B at 4K, ZeRO-1, bf16_loop, compiled layers
    python benchmarks/train_check.py --out gpu_check/train_zero1 -- model=ouro_1p4b parallel=zero1 \\
        train.precision=bf16_loop train.seq_len=4096 train.micro_batch_size=1 train.global_batch_size=1
    # the CPU rehearsal:
    .venv/bin/python benchmarks/train_check.py --out /tmp/train_check -- model=tiny parallel.zero_stage=1 \\
        train.precision=bf16_loop train.seq_len=64 train.micro_batch_size=2 train.global_batch_size=2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def metrics(run_dir: Path) -> dict[int, dict]:
    """Training-step records of metrics.jsonl by step."""
    rows = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip())
    return {row["step"]: row for row in rows if "loss" in row and "grad_norm" in row}


def launch(nproc: int, overrides: list[str], log: Path) -> None:
    command = ["bash", str(ROOT / "launch" / "torchrun.sh"), str(nproc), *overrides]
    print("$", " ".join(command), flush=True)
    with log.open("w") as out:
        status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    lines = log.read_text().strip().splitlines()
    if status != 0:
        print("\n".join(lines[-40:]) if lines else "(no output)")
        sys.exit(f"launch failed with exit status {status}: see {log}")
    print(lines[-1] if lines else "(no output)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="a new directory for both runs and their logs")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8, help="steps of launch A (B resumes just past half)")
    parser.add_argument("--keep", action="store_true", help="keep launch A's checkpoint")
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=2,
        help="profile launch A's steps 3.. (logging.profile_start=3; 0: off) and print the breakdown",
    )
    parser.add_argument("overrides", nargs="*", help="ouro-train overrides (after --)")
    args = parser.parse_args()
    half = args.steps // 2 + 1  # the one checkpoint: 2 * half > steps
    args.out.mkdir(parents=True, exist_ok=True)
    common = [
        *args.overrides,
        f"train.steps={args.steps}",
        "train.log_every=1",
        "schedule.warmup_steps=1",
        "checkpoint.every_minutes=0",
        "logging.plot=false",
        "checkpoint.save_final=false",
    ]
    first, second = args.out / "a", args.out / "b"
    # Steps 1-2 compile and warm up; the profiled ones (after them, before the checkpoint) are left
    # out of the tokens/s median below (the profiler and its two synchronisations slow them).
    profiled = set(range(3, 3 + args.profile_steps)) if args.profile_steps and 3 + args.profile_steps <= half else set()
    profiling = ["logging.profile_start=3", f"logging.profile_steps={len(profiled)}"] if profiled else []
    checkpoint = first / "checkpoints" / f"step_{half:08d}"
    try:
        launch(
            args.nproc, [*common, *profiling, f"run_dir={first}", f"checkpoint.every_steps={half}"], args.out / "a.log"
        )
        launch(args.nproc, [*common, f"run_dir={second}", f"checkpoint.resume={checkpoint}"], args.out / "b.log")
    finally:  # also after a failed launch: the next check needs the disk
        if not args.keep:
            shutil.rmtree(first / "checkpoints", ignore_errors=True)
    a, b = metrics(first), metrics(second)
    resumed = sorted(step for step in b if step > half)
    if resumed != list(range(half + 1, args.steps + 1)):
        sys.exit(f"the resumed run logged steps {resumed}, expected {half + 1}..{args.steps}")
    differ = [s for s in resumed if (a[s]["loss"], a[s]["grad_norm"]) != (b[s]["loss"], b[s]["grad_norm"])]
    for step in resumed:
        print(f"step {step}: loss {a[step]['loss']:.6f} / resumed {b[step]['loss']:.6f}")
    for summary in sorted((first / "profile").glob("*.txt")):  # rank 0's: where launch A's step goes
        print(summary.read_text().rstrip())
    timed = [s for s in sorted(a) if s > 2 and s not in profiled]
    if timed:
        speeds = [a[s]["tokens_per_s"] for s in timed]
        print(f"ouro-train tokens/s (launch A, median of steps {timed}): {statistics.median(speeds):,.0f}")
        waits = [a[s]["data_wait_s"] / a[s]["step_time_s"] for s in timed if "data_wait_s" in a[s]]
        if waits:  # the host's wait for the data, a share of the step (the trainer against the benchmark)
            print(f"data wait (median share of the step): {statistics.median(waits):.1%}")
    if differ:
        sys.exit(f"resume is not exact at steps {differ}")
    print(f"resume exact: steps {half + 1}..{args.steps} equal bit for bit")


if __name__ == "__main__":
    main()
