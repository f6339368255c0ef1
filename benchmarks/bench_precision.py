"""train.precision=bf16_loop against bf16 (autocast), A/B in one process.

Two trainers over copies of the same model take turns, one optimizer step each (`--accum`
micro-batches): A bf16_loop (the shared linears' bf16 copies made once per optimizer step, their R
weight gradients accumulated in fp32 by the GEMMs), B bf16 autocast. Median step times, A/B ratio,
and the first and last losses of each (they train the same batches from the same weights, so the
losses must agree to bf16 rounding).

    .venv/bin/python benchmarks/bench_precision.py [--hidden 256 --layers 4 --seq 256 --rows 4 --steps 12]
    python benchmarks/bench_precision.py --device cuda --hidden 2048 --layers 24 --seq 4096 --rows 1 --compile
"""

from __future__ import annotations

import copy
import statistics

import step_ab
import torch

from ouro_train.config.resolve import resolve
from ouro_train.model import LoopLM
from ouro_train.parallel.checkpointing import apply_compile
from ouro_train.parallel.precision import apply_loop_precision
from ouro_train.train.trainer import Trainer

VARIANTS = ("bf16_loop", "bf16")


def main() -> None:
    parser = step_ab.parser(__doc__)
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (parallel.compile)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LoopLM(step_ab.config(args).model)
    trainers = {}
    for precision in VARIANTS:
        cfg = step_ab.config(args)
        cfg.train.precision = precision
        cfg.train.grad_accum_steps = args.accum
        replica = copy.deepcopy(model)
        if precision == "bf16_loop":
            apply_loop_precision(replica)
        if args.compile:
            apply_compile(replica)
        trainers[precision] = Trainer(cfg, replica, step_ab.batches(args), resolved=resolve(cfg))
    device = torch.device(args.device)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    losses: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for index in range(2 * (args.steps + 2)):
        precision = VARIANTS[index % 2]
        metrics, seconds = step_ab.timed_step(trainers[precision], device)
        losses[precision].append(metrics["loss"])
        if index >= 4:
            times[precision].append(seconds)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"device {args.device}, {params:,} parameters, R={model.config.recurrent_steps}, {args.accum} x {args.rows} x "
        f"{args.seq} tokens/step, compile {args.compile}, median of {args.steps} steps"
    )
    a, b = (statistics.median(times[v]) for v in VARIANTS)
    print(f"training step: A bf16_loop {a * 1e3:.1f} ms, B bf16 {b * 1e3:.1f} ms, A/B {a / b:.4f}")
    for v in VARIANTS:
        print(f"{v}: loss step 1 {losses[v][0]:.5f}, step {len(losses[v])} {losses[v][-1]:.5f}")


if __name__ == "__main__":
    main()
