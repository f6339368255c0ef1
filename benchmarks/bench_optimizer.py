"""torch's fused AdamW against its foreach implementation (optim.fused), A/B in one process.

Two trainers over the same model (each with its own optimizer state) take turns: A fused, B
foreach; the whole training step and the optimizer step alone are timed, medians printed.

    .venv/bin/python benchmarks/bench_optimizer.py [--hidden 256 --layers 4 --seq 256 --rows 4 --steps 12]
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
    model_cfg = ModelConfig(
        name="bench",
        vocab_size=vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
        num_kv_heads=max(1, args.hidden // 128),
        intermediate_size=int(args.hidden * 2.75),
    )
    torch.manual_seed(0)
    model = LoopLM(model_cfg)
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            tokens = torch.randint(0, vocab, (args.rows, args.seq + 1), generator=g)
            yield {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    trainers = {}
    for fused in (True, False):
        cfg = Config(
            model=model_cfg,
            optim=OptimConfig(lr=3e-4, fused=fused),
            train=TrainConfig(steps=10_000, micro_batch_size=args.rows, seq_len=args.seq, device=args.device),
        )
        trainers[fused] = Trainer(cfg, model, batches())
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
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
