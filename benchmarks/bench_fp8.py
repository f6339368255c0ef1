"""train.precision=fp8 against bf16_loop: the loss curve and the step time, in one process.

Two trainers (the product's `Trainer`, one process) from the same initial weights on the same
batches, steps alternating: A fp8 (the shared linears' forward and input-gradient GEMMs in float8,
each weight quantised once per optimizer step), B bf16_loop. The batches are a learnable synthetic
language (each token drawn from a fixed random sparse bigram table, seeded), so the loss falls
towards the table's entropy and the two curves can be compared. Prints the mean loss of each
window of --window steps for both, the last window's difference, and the median step times.

    .venv/bin/python benchmarks/bench_fp8.py [--hidden 256 --layers 4 --seq 256 --rows 4 --steps 300 --lr 3e-3]
"""

from __future__ import annotations

import statistics

import step_ab
import torch

from ouro_train.config.resolve import resolve
from ouro_train.model import LoopLM
from ouro_train.parallel.precision import apply_loop_precision, check_fp8_device
from ouro_train.train.trainer import Trainer


def bigram_batches(args, seed: int = 0, branching: int = 4):
    """Endless batches of a random sparse bigram language: each token is followed by one of
    `branching` tokens (its own, fixed, with random probabilities): entropy <= log(branching)."""
    g = torch.Generator().manual_seed(seed)
    vocab = step_ab.VOCAB
    successors = torch.randint(0, vocab, (vocab, branching), generator=g)
    weights = torch.rand(vocab, branching, generator=g) + 0.1
    while True:
        tokens = torch.empty(args.rows, args.seq + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab, (args.rows,), generator=g)
        for i in range(args.seq):
            pick = torch.multinomial(weights[tokens[:, i]], 1, generator=g).squeeze(1)
            tokens[:, i + 1] = successors[tokens[:, i], pick]
        yield {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def main() -> None:
    parser = step_ab.parser(__doc__)
    parser.set_defaults(steps=300)
    parser.add_argument("--window", type=int, default=50, help="steps per printed mean")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and data")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (warmup 10%%, then constant)")
    args = parser.parse_args()
    device = torch.device(args.device)
    check_fp8_device(args.device)
    trainers = {}
    for precision in ("fp8", "bf16_loop"):
        cfg = step_ab.config(args)
        cfg.train.precision = precision
        cfg.optim.lr = args.lr
        cfg.train.steps = args.steps
        cfg.schedule.warmup_steps = max(1, args.steps // 10)
        torch.manual_seed(args.seed)
        model = apply_loop_precision(LoopLM(cfg.model).to(device), fp8=precision == "fp8")
        trainers[precision] = Trainer(cfg, model, bigram_batches(args, args.seed), resolved=resolve(cfg))
    losses: dict[str, list[float]] = {p: [] for p in trainers}
    times: dict[str, list[float]] = {p: [] for p in trainers}
    for step in range(args.steps):
        for precision, trainer in trainers.items():
            metrics, seconds = step_ab.timed_step(trainer, device)
            if step >= 2:
                times[precision].append(seconds)
            losses[precision].append(metrics["loss"])
    params = sum(p.numel() for p in trainers["fp8"].model.parameters())
    print(
        f"device {args.device}, {params:,} parameters, {args.rows} x {args.seq} tokens per step, {args.steps} steps, "
        f"lr {args.lr:g}, seed {args.seed}"
    )
    print("| steps | A fp8 | B bf16_loop | A - B |")
    print("|---|---|---|---|")
    for start in range(0, args.steps, args.window):
        a = statistics.fmean(losses["fp8"][start : start + args.window])
        b = statistics.fmean(losses["bf16_loop"][start : start + args.window])
        print(f"| {start + 1}-{min(start + args.window, args.steps)} | {a:.4f} | {b:.4f} | {a - b:+.4f} |")
    a, b = statistics.median(times["fp8"]), statistics.median(times["bf16_loop"])
    print(f"step time (median): A fp8 {a * 1e3:.1f} ms, B bf16_loop {b * 1e3:.1f} ms, A/B {a / b:.4f}")


if __name__ == "__main__":
    main()
