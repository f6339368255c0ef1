"""torch's fused AdamW against its foreach implementation (optim.fused), A/B in one process.

Two trainers over the same model (each with its own optimizer state) take turns: A fused, B
foreach; the whole training step and the optimizer step alone are timed, medians printed.

    .venv/bin/python benchmarks/bench_optimizer.py [--hidden 256 --layers 4 --seq 256 --rows 4 --steps 12]
"""

from __future__ import annotations

import statistics
import time

import step_ab
import torch

from ouro_train.config.resolve import resolve
from ouro_train.model import LoopLM
from ouro_train.train.trainer import Trainer


def main() -> None:
    args = step_ab.parser(__doc__).parse_args()
    torch.manual_seed(0)
    model = LoopLM(step_ab.config(args).model)
    configs = {fused: step_ab.config(args, fused=fused) for fused in (True, False)}
    trainers = {
        fused: Trainer(cfg, model, step_ab.batches(args), resolved=resolve(cfg)) for fused, cfg in configs.items()
    }
    device = torch.device(args.device)
    sync = lambda: step_ab.synchronize(device)  # noqa: E731
    step_times: dict[bool, list[float]] = {True: [], False: []}
    optimizer_times: dict[bool, list[float]] = {True: [], False: []}
    for index in range(2 * (args.steps + 2)):
        fused = index % 2 == 0
        trainer = trainers[fused]
        optimizer = trainer.engine.optimizer
        inner_step = optimizer.step

        def timed_step(*a, _inner=inner_step, _fused=fused, _warm=index >= 4, **k):
            sync()
            started = time.perf_counter()
            out = _inner(*a, **k)
            sync()
            if _warm:
                optimizer_times[_fused].append(time.perf_counter() - started)
            return out

        optimizer.step = timed_step
        sync()
        started = time.perf_counter()
        trainer.train_step()
        sync()
        if index >= 4:
            step_times[fused].append(time.perf_counter() - started)
        optimizer.step = inner_step
    params = sum(p.numel() for p in model.parameters())
    print(f"device {args.device}, {params:,} parameters, {args.rows} x {args.seq} tokens/step, median of {args.steps}")
    for label, times in (("training step", step_times), ("optimizer step", optimizer_times)):
        a, b = statistics.median(times[True]), statistics.median(times[False])
        print(f"{label}: A fused {a * 1e3:.1f} ms, B foreach {b * 1e3:.1f} ms, A/B {a / b:.4f}")


if __name__ == "__main__":
    main()
