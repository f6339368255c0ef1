"""What the stability guard's update check costs per training step: A/B in one process.

The guard judges each update before it is applied (train/guard.py): the step computes ||w|| of
the trained weights (one foreach norm, sent with the loss totals in the same all-reduce) and
AdamW's bound on ||dw|| / ||w||. A: that check as shipped; B: the same trainer with the parameter
norm replaced by a constant and the check off (guard.max_update_ratio=0), i.e. the step before
the check existed. Steps alternate A, B, A, B... on the same model and batches; medians printed.

    .venv/bin/python benchmarks/bench_guard.py [--hidden 256 --layers 4 --seq 256 --rows 4 --steps 12]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ouro_train.config import Config, ModelConfig, OptimConfig, TrainConfig
from ouro_train.model import LoopLM
from ouro_train.train.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant (after 2 warm-up steps each)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    vocab = 4096
    cfg = Config(
        model=ModelConfig(
            name="bench",
            vocab_size=vocab,
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=args.hidden // 64,
            num_kv_heads=max(1, args.hidden // 128),
            intermediate_size=int(args.hidden * 2.75),
        ),
        optim=OptimConfig(lr=3e-4),
        train=TrainConfig(steps=10_000, micro_batch_size=args.rows, seq_len=args.seq, device=args.device),
    )
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            tokens = torch.randint(0, vocab, (args.rows, args.seq + 1), generator=g)
            yield {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    trainer = Trainer(cfg, LoopLM(cfg.model), batches())
    shipped = trainer.engine.param_norm_sq_share
    device = torch.device(args.device)

    def variant(check: bool) -> None:
        trainer.cfg.guard.max_update_ratio = 1.0 if check else 0.0
        trainer.engine.param_norm_sq_share = shipped if check else (lambda: torch.ones((), device=device))

    times: dict[bool, list[float]] = {True: [], False: []}
    for index in range(2 * (args.steps + 2)):
        check = index % 2 == 0
        variant(check)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        metrics = trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= 4:
            times[check].append(time.perf_counter() - started)
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
