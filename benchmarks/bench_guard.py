"""What the stability guard's update check costs per training step: A/B in one process.

The guard judges each update before it is applied (optim/guard.py): the step computes ||w|| of
the trained weights (one foreach norm, sent with the loss totals in the same all-reduce) and
AdamW's bound on ||dw|| / ||w||. A: that check as shipped; B: the same trainer with the parameter
norm replaced by a constant and the check off (guard.max_update_ratio=0), i.e. the step before
the check existed. Steps alternate A, B, A, B... on the same model and batches; medians printed.

    .venv/bin/python benchmarks/bench_guard.py [--hidden 256 --layers 4 --seq 256 --rows 4 --steps 12]
"""

from __future__ import annotations

import statistics

import step_ab
import torch


def main() -> None:
    args = step_ab.parser(__doc__).parse_args()
    cfg = step_ab.config(args)
    trainer = step_ab.trainer(args, cfg)
    shipped, limit = trainer.engine.param_norm_sq_share, cfg.guard.max_update_ratio
    device = torch.device(args.device)

    def variant(check: bool) -> None:
        trainer.cfg.guard.max_update_ratio = limit if check else 0.0
        trainer.engine.param_norm_sq_share = shipped if check else (lambda: torch.ones((), device=device))

    times: dict[bool, list[float]] = {True: [], False: []}
    for index in range(2 * (args.steps + 2)):
        check = index % 2 == 0
        variant(check)
        metrics, seconds = step_ab.timed_step(trainer, device)
        if index >= 4:
            times[check].append(seconds)
        trainer.guard.record(trainer.state.step, metrics["loss"], trainer.pending_verdict)
    params = sum(p.numel() for p in trainer.model.parameters())
    a, b = statistics.median(times[True]), statistics.median(times[False])
    print(
        f"device {args.device}, {params:,} parameters, {args.rows} x {args.seq} tokens per step, "
        f"median of {args.steps} steps each"
    )
    print(f"A with the update check: {a * 1e3:.1f} ms/step")
    print(f"B without it:            {b * 1e3:.1f} ms/step")
    print(f"A/B: {a / b:.4f}")


if __name__ == "__main__":
    main()
