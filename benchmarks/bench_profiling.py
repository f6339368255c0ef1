"""What profiling costs a training step (logging.profile_*, ouro_train/train/profiling.py): A/B/C in
one process on the same model and batches, steps alternating.

A: the step as every unprofiled step runs it (`Trainer.profiling` off: the phase marks are
nullcontexts); B: the phase marks on (torch's record_function per phase) with no profiler running;
C: the step under torch.profiler (CPU activity, plus CUDA on a GPU), as the profiled window runs.
Medians printed; A/B says what the marks cost when nobody profiles (nothing, by design: they are
only made inside the window), C/A what the profiler costs the steps it traces.

    .venv/bin/python benchmarks/bench_profiling.py [--hidden 256 --layers 4 --seq 256 --rows 4 --steps 12]
"""

from __future__ import annotations

import statistics

import step_ab
import torch
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    args = step_ab.parser(__doc__).parse_args()
    cfg = step_ab.config(args)
    trainer = step_ab.trainer(args, cfg)
    device = torch.device(args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    times: dict[str, list[float]] = {"A": [], "B": [], "C": []}
    for index in range(3 * (args.steps + 2)):
        variant = "ABC"[index % 3]
        trainer.profiling = variant != "A"
        if variant == "C":
            with profile(activities=activities):
                _, seconds = step_ab.timed_step(trainer, device)
        else:
            _, seconds = step_ab.timed_step(trainer, device)
        if index >= 6:
            times[variant].append(seconds)
    params = sum(p.numel() for p in trainer.model.parameters())
    a, b, c = (statistics.median(times[v]) for v in "ABC")
    print(
        f"device {args.device}, {params:,} parameters, {args.rows} x {args.seq} tokens per step, "
        f"median of {args.steps} steps each"
    )
    print(f"A unprofiled step:           {a * 1e3:.1f} ms/step")
    print(f"B phase marks, no profiler:  {b * 1e3:.1f} ms/step")
    print(f"C under torch.profiler:      {c * 1e3:.1f} ms/step")
    print(f"B/A: {b / a:.4f}   C/A: {c / a:.4f}")


if __name__ == "__main__":
    main()
