"""ZeRO-1/2's fp32 master: the weights' own partition (`share_fp32_master`, ouro_train/parallel/
engine.py) against DeepSpeed's clone of it, A/B in one pair of processes (data parallel 2, gloo),
steps alternating on the same weights and batches. Prints each variant's median step time, the bytes
its masters hold apart from the weights, and its first losses (equal: the same arithmetic).

    .venv/bin/python benchmarks/bench_zero_master.py [--zero 1 --hidden 256 --layers 4 --seq 256 --rows 4 --steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

VARIANTS = ("shared", "clone")


def run(args: dict) -> dict:
    import torch
    from step_ab import batches, config

    import ouro_train.parallel.engine as engine_module
    from ouro_train.config import ParallelConfig
    from ouro_train.config.resolve import resolve
    from ouro_train.model import LoopLM
    from ouro_train.parallel import destroy_parallel, init_parallel, parallelize
    from ouro_train.train.trainer import Trainer

    size = argparse.Namespace(**args)
    cfg = config(size)
    cfg.parallel = ParallelConfig(zero_stage=args["zero"])
    layout = init_parallel(cfg.parallel, cfg.model, "cpu")

    share = engine_module.share_fp32_master
    try:
        trainers, apart = {}, {}
        for variant in VARIANTS:
            engine_module.share_fp32_master = share if variant == "shared" else (lambda _optimizer: 0)
            torch.manual_seed(0)
            model = LoopLM(cfg.model)
            engine = parallelize(model, cfg, layout, resolve(cfg, layout.dp))
            flats = engine.optimizer.bit16_groups_flat
            apart[variant] = sum(
                m.numel() * m.element_size()
                for m, f in zip(engine.optimizer.single_partition_of_fp32_groups, flats)
                if m.untyped_storage().data_ptr() != f.untyped_storage().data_ptr()
            )
            trainers[variant] = Trainer(
                cfg, model, batches(size, seed=layout.dp_rank), engine=engine, resolved=resolve(cfg, layout.dp)
            )
        times: dict = {v: [] for v in VARIANTS}
        losses: dict = {v: [] for v in VARIANTS}
        for index in range(len(VARIANTS) * (args["steps"] + 2)):
            variant = VARIANTS[index % len(VARIANTS)]
            started = time.perf_counter()
            metrics = trainers[variant].train_step()
            if index >= 2 * len(VARIANTS):
                times[variant].append(time.perf_counter() - started)
            losses[variant].append(metrics["loss"])
        return {"times": times, "losses": losses, "apart": apart}
    finally:
        engine_module.share_fp32_master = share
        destroy_parallel()


def main() -> None:
    from step_ab import parser as size_parser

    parser = size_parser(__doc__)
    parser.set_defaults(steps=8, device="cpu")
    parser.add_argument("--zero", type=int, default=1, choices=(1, 2))
    args = parser.parse_args()
    from ouro_train.parallel.testing import run_distributed

    print(
        f"ZeRO-{args.zero}, data parallel 2 (gloo, 2 processes), hidden {args.hidden}, {args.layers} layers x 4 "
        f"steps, {args.rows} x {args.seq} tokens per rank and step; median of {args.steps} steps"
    )
    result = run_distributed(run, 2, vars(args), timeout=1800)[0]
    ms = {v: statistics.median(result["times"][v]) * 1e3 for v in VARIANTS}
    for variant in VARIANTS:
        first = " ".join(f"{loss:.5f}" for loss in result["losses"][variant][:3])
        print(
            f"master {variant:<7} {ms[variant]:8.1f} ms  fp32 master apart from the weights "
            f"{result['apart'][variant] / 2**20:7.2f} MiB per rank  losses {first}"
        )
    print(f"shared/clone step time {ms['shared'] / ms['clone']:.4f}")


if __name__ == "__main__":
    main()
