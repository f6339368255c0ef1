"""Step time and peak memory per process on CPU (gloo): ZeRO 0 vs 3 and tensor parallel 1 vs 2.

Every layout trains the same model on the same global batch for `--steps` steps in 2 processes
(plus a 1-process baseline); the step time is the median after 2 warm-up steps, the memory the
peak resident set of each process (VmHWM: ru_maxrss would carry the parent's peak across the
spawn's exec; it includes the Python/torch/DeepSpeed runtime, so compare differences).
CPU figures show the mechanics, not GPU speed.

    .venv/bin/python benchmarks/bench_parallel.py [--hidden 512 --layers 4 --steps 6]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics

import torch

LAYOUTS = [  # (label, processes, tensor parallel, ZeRO stage)
    ("1 process, no ZeRO", 1, 1, 0),
    ("DP=2, ZeRO 0", 2, 1, 0),
    ("DP=2, ZeRO 3", 2, 1, 3),
    ("TP=2, ZeRO 0", 2, 2, 0),
    ("TP=2, ZeRO 1", 2, 2, 1),
]


def peak_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def bench_model(args: dict):
    from ouro_train.config import ModelConfig

    h = args["hidden"]
    return ModelConfig(
        name="bench",
        vocab_size=args["vocab"],
        hidden_size=h,
        num_layers=args["layers"],
        num_heads=h // 64,
        num_kv_heads=h // 64,
        intermediate_size=h * 11 // 4,
        recurrent_steps=4,
    )


def run(args: dict, tp: int, zero: int) -> dict:
    from ouro_train.config import Config, ParallelConfig, TrainConfig
    from ouro_train.config.resolve import resolve
    from ouro_train.model import LoopLM
    from ouro_train.parallel import destroy_parallel, init_parallel, parallelize
    from ouro_train.train.trainer import Trainer

    torch.set_num_threads(1)  # one core per process: 2 processes on a 2-core machine
    world = int(os.environ.get("WORLD_SIZE", 1))
    cfg = Config(
        model=bench_model(args),
        train=TrainConfig(steps=args["steps"], micro_batch_size=args["batch"] * tp // world, seq_len=args["seq"]),
        parallel=ParallelConfig(tensor_parallel=tp, zero_stage=zero),
    )
    layout = init_parallel(cfg.parallel, cfg.model, "cpu")
    resolved = resolve(cfg, layout.dp)
    try:
        torch.manual_seed(0)
        model = LoopLM(cfg.model)
        engine = parallelize(model, cfg, layout, resolved)
        g = torch.Generator().manual_seed(layout.dp_rank)
        rows = cfg.train.micro_batch_size

        def batches():
            while True:
                tokens = torch.randint(0, args["vocab"], (rows, args["seq"] + 1), generator=g)
                yield {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

        trainer = Trainer(cfg, model, batches(), engine=engine, resolved=resolved)
        times = [trainer.train_step()["step_time_s"] for _ in range(args["steps"])]
        return {"step_s": statistics.median(times[2:]), "peak_mb": peak_rss_mb()}
    finally:
        destroy_parallel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="global batch (sequences)")
    parser.add_argument("--steps", type=int, default=6)
    args = vars(parser.parse_args())
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from ouro_train.model import LoopLM
    from ouro_train.parallel.testing import run_distributed

    print(
        f"LoopLM hidden {args['hidden']}, {args['layers']} layers x 4 steps, vocab {args['vocab']}; global batch "
        f"{args['batch']} x {args['seq']} tokens; CPU, gloo, 1 thread per process"
    )
    params = LoopLM(bench_model(args)).num_parameters()
    print(f"{params / 1e6:.1f}M parameters = {params * 16 / 2**20:.0f} MB of fp32 weights + grads + Adam states")
    for label, procs, tp, zero in LAYOUTS:
        results = run_distributed(run, procs, args, tp, zero) if procs > 1 else [run(args, tp, zero)]
        step = max(r["step_s"] for r in results)
        peak = max(r["peak_mb"] for r in results)
        print(f"  {label:20s} step {step * 1e3:7.0f} ms   peak RSS per process {peak:6.0f} MB")


if __name__ == "__main__":
    main()
