"""The tensor-parallel linears' forward: ours (`F.linear` between megatron-core's region collectives,
ouro_train/parallel/tensor_parallel.py) against megatron-core's own (its autograd Function with the
asynchronous input-gradient all-reduce), A/B in one pair of processes (TP = 2, gloo), steps
alternating on the same model and batches, eager and with compiled decoder layers.

Compiled, megatron's forward breaks the layer's graph at every linear (and under `layer`
checkpointing leaves the layer uncompiled); ours compiles to one graph. The script prints each
variant's median step time and the graphs and graph breaks dynamo made.

    .venv/bin/python benchmarks/bench_tp_linear.py [--hidden 256 --layers 4 --seq 256 --rows 4 --steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import time


def megatron_classes():
    """Subclasses of ours whose forward is megatron-core's own (variant B)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from ouro_train.parallel.tensor_parallel import ColumnParallel, RowParallel

    class MegatronColumn(ColumnParallel):
        def forward(self, x):
            return ColumnParallelLinear.forward(self, x)[0]

    class MegatronRow(RowParallel):
        def forward(self, x):
            return RowParallelLinear.forward(self, x)[0]

    return {ColumnParallel: MegatronColumn, RowParallel: MegatronRow}


def run(args: dict) -> dict:
    import torch
    from step_ab import batches, config
    from torch._dynamo.utils import counters

    from ouro_train.config import ParallelConfig
    from ouro_train.config.resolve import resolve
    from ouro_train.model import LoopLM
    from ouro_train.parallel import destroy_parallel, init_parallel, parallelize
    from ouro_train.train.trainer import Trainer

    size = argparse.Namespace(**args)
    cfg = config(size)
    cfg.model.num_kv_heads = max(2, cfg.model.num_kv_heads)  # tensor parallel 2 splits the KV heads
    cfg.parallel = ParallelConfig(
        tensor_parallel=2, zero_stage=1, compile=args["compile"], activation_checkpointing=args["checkpointing"]
    )
    layout = init_parallel(cfg.parallel, cfg.model, "cpu")

    try:
        trainers = {}
        for variant in ("ours", "megatron"):
            torch.manual_seed(0)
            model = LoopLM(cfg.model)
            engine = parallelize(model, cfg, layout, resolve(cfg, layout.dp))
            if variant == "megatron":  # before the first call: the compiled layers trace its forward
                swap = megatron_classes()
                for module in model.modules():
                    module.__class__ = swap.get(type(module), type(module))
            trainers[variant] = Trainer(cfg, model, batches(size), engine=engine, resolved=resolve(cfg, engine.dp_size))
        times: dict[str, list[float]] = {"ours": [], "megatron": []}
        graphs: dict[str, tuple[int, int]] = {}
        for index in range(2 * (args["steps"] + 2)):
            variant = "ours" if index % 2 == 0 else "megatron"
            before = (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()))
            started = time.perf_counter()
            trainers[variant].train_step()
            seconds = time.perf_counter() - started
            if index < 2:  # each variant's first step compiles: what it made
                graphs[variant] = (
                    counters["stats"]["unique_graphs"] - before[0],
                    sum(counters["graph_break"].values()) - before[1],
                )
            if index >= 4:
                times[variant].append(seconds)
        return {"times": times, "graphs": graphs}
    finally:
        destroy_parallel()


def main() -> None:
    from step_ab import parser as size_parser

    parser = size_parser(__doc__)
    parser.set_defaults(steps=8, device="cpu")
    args = parser.parse_args()
    from ouro_train.parallel.testing import run_distributed

    print(
        f"TP=2 (gloo, 2 processes, ZeRO-1), hidden {args.hidden}, {args.layers} layers x 4 steps, "
        f"{args.rows} x {args.seq} tokens per step; median of {args.steps} steps per variant"
    )
    for compiled, checkpointing in ((False, "none"), (True, "none"), (True, "layer")):
        setting = vars(args) | {"compile": compiled, "checkpointing": checkpointing}
        result = run_distributed(run, 2, setting, timeout=1200)[0]
        a, b = (statistics.median(result["times"][v]) for v in ("ours", "megatron"))
        made = ", ".join(f"{v}: {g} graphs, {br} breaks" for v, (g, br) in result["graphs"].items())
        label = f"compiled, checkpointing {checkpointing}" if compiled else "eager"
        print(f"{label:<32} ours {a * 1e3:7.1f} ms  megatron {b * 1e3:7.1f} ms  ours/megatron {a / b:.4f}  ({made})")


if __name__ == "__main__":
    main()
