"""ZeRO-3 on a LoopLM: the decoder layers gathered once per pass (`parallel.zero3_gather=trunk`,
ouro_train/parallel/zero3.py) against DeepSpeed's per-module gathering at each of their R uses
(`layer`), A/B in one pair of processes (data parallel 2, gloo), steps alternating, same weights and
batches; `trunk` also with compiled decoder layers (refused under `layer`).

Two DeepSpeed settings: its defaults, which at this small size keep the whole model gathered all
step (only the hooks' host work differs), and `--release` (no prefetch, nothing kept between
module calls: what happens at Ouro's sizes, where the trunk is beyond stage3_max_live_parameters,
1e9 elements, and the norms and gate stay whole below the persistence threshold). The script prints
each variant's median step time, its all-gathers per step (torch.profiler's c10d records) and its
first losses.

    .venv/bin/python benchmarks/bench_zero3.py [--hidden 256 --layers 4 --seq 256 --rows 4 --steps 8] [--release]
"""

from __future__ import annotations

import argparse
import statistics
import time

VARIANTS = (("trunk", False), ("layer", False), ("trunk", True))


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
    if args["release"]:
        plain = engine_module.deepspeed_config

        def release_after_each_call(cfg, resolved):
            settings = plain(cfg, resolved)
            settings["zero_optimization"].update(
                stage3_param_persistence_threshold=args["hidden"] + 1,
                stage3_max_live_parameters=0,
                stage3_max_reuse_distance=0,
                stage3_prefetch_bucket_size=0,
            )
            return settings

        engine_module.deepspeed_config = release_after_each_call

    def zero3(gather: str, compiled: bool):
        cfg = config(size)
        cfg.parallel = ParallelConfig(zero_stage=3, zero3_gather=gather, compile=compiled)
        return cfg

    layout = init_parallel(zero3("trunk", False).parallel, zero3("trunk", False).model, "cpu")

    try:
        trainers = {}
        for gather, compiled in VARIANTS:
            cfg = zero3(gather, compiled)
            torch.manual_seed(0)
            model = LoopLM(cfg.model)
            engine = parallelize(model, cfg, layout, resolve(cfg, layout.dp))
            trainers[gather, compiled] = Trainer(
                cfg, model, batches(size, seed=layout.dp_rank), engine=engine, resolved=resolve(cfg, layout.dp)
            )
        times: dict = {v: [] for v in VARIANTS}
        losses: dict = {v: [] for v in VARIANTS}
        gathers: dict = {}
        for index in range(len(VARIANTS) * (args["steps"] + 3)):
            variant = VARIANTS[index % len(VARIANTS)]
            round_ = index // len(VARIANTS)
            if round_ == 1:  # the second step of each: its all-gathers
                with torch.profiler.profile() as prof:
                    metrics = trainers[variant].train_step()
                gathers[variant] = sum("allgather" in event.name for event in prof.events())
            else:
                started = time.perf_counter()
                metrics = trainers[variant].train_step()
                if round_ >= 3:
                    times[variant].append(time.perf_counter() - started)
            losses[variant].append(metrics["loss"])
        return {"times": times, "gathers": gathers, "losses": losses}
    finally:
        destroy_parallel()


def main() -> None:
    from step_ab import parser as size_parser

    parser = size_parser(__doc__)
    parser.set_defaults(steps=8, device="cpu")
    parser.add_argument("--release", action="store_true", help="nothing kept gathered between module calls")
    args = parser.parse_args()
    from ouro_train.parallel.testing import run_distributed

    print(
        f"ZeRO-3, data parallel 2 (gloo, 2 processes), hidden {args.hidden}, {args.layers} layers x 4 steps, "
        f"{args.rows} x {args.seq} tokens per rank and step; DeepSpeed "
        f"{'releasing after each module call' if args.release else 'defaults'}; median of {args.steps} steps"
    )
    result = run_distributed(run, 2, vars(args), timeout=1800)[0]
    base = statistics.median(result["times"]["layer", False])
    for variant in VARIANTS:
        gather, compiled = variant
        ms = statistics.median(result["times"][variant]) * 1e3
        label = f"zero3_gather={gather}{', compiled' if compiled else ''}"
        first = " ".join(f"{loss:.5f}" for loss in result["losses"][variant][:3])
        print(
            f"{label:<30} {ms:8.1f} ms  layer/this {base * 1e3 / ms:5.2f}x  "
            f"all-gathers/step {result['gathers'][variant]:4d}  losses {first}"
        )


if __name__ == "__main__":
    main()
