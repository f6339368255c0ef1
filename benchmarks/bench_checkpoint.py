"""What checkpoints cost on CPU (gloo, 2 processes, ZeRO-1): a periodic save, a stage's final save
(which also gathers the layout-free optimizer.safetensors), the one-time universal-checkpoint
conversion for resuming at another data-parallel size, and loading it on 1 process.
Medians over `--repeats` saves; the conversion and load are timed once (the cache makes a second
conversion free). CPU figures show relative costs, not a cluster's filesystem.

    .venv/bin/python benchmarks/bench_checkpoint.py [--hidden 512 --layers 4 --repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_parallel import bench_model  # noqa: E402


def save_and_time(args: dict, tmp: str) -> dict:
    from ouro_train.checkpoint.manager import Checkpointer
    from ouro_train.config import Config, ParallelConfig, TrainConfig
    from ouro_train.config.resolve import resolve
    from ouro_train.model import LoopLM
    from ouro_train.parallel import destroy_parallel, init_parallel, parallelize
    from ouro_train.train.trainer import Trainer

    torch.set_num_threads(1)
    cfg = Config(
        model=bench_model(args),
        train=TrainConfig(steps=10, micro_batch_size=1, seq_len=64),
        parallel=ParallelConfig(zero_stage=1),
    )
    layout = init_parallel(cfg.parallel, cfg.model, "cpu")
    resolved = resolve(cfg, layout.dp)
    try:
        torch.manual_seed(0)
        model = LoopLM(cfg.model)
        engine = parallelize(model, cfg, layout, resolved)
        g = torch.Generator().manual_seed(layout.rank)
        batches = iter(
            lambda: {
                "input_ids": torch.randint(0, 512, (1, 64), generator=g),
                "labels": torch.randint(0, 512, (1, 64), generator=g),
            },
            None,
        )
        trainer = Trainer(cfg, model, batches, engine=engine, resolved=resolved)
        trainer.train_step()
        checkpointer = Checkpointer(cfg, Path(tmp), layout.rank, layout.world_size, resolved=resolved)
        times = {"periodic": [], "final": []}
        for repeat in range(args["repeats"]):
            for kind in ("periodic", "final"):
                trainer.state.step = 1 + 2 * repeat + (kind == "final")
                started = time.perf_counter()
                path = checkpointer.save(trainer, None, final=kind == "final")
                times[kind].append(time.perf_counter() - started)
        return {"times": times, "last": str(path), "params": model.num_parameters()}
    finally:
        destroy_parallel()


def main() -> None:
    from ouro_train.checkpoint.universal import ensure_universal
    from ouro_train.parallel.testing import run_distributed

    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    args = vars(parser.parse_args())
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        result = run_distributed(save_and_time, 2, args, tmp, timeout=1200)[0]
        last = Path(result["last"])
        size = sum(f.stat().st_size for f in last.rglob("*") if f.is_file()) / 2**20
        started = time.perf_counter()
        universal = ensure_universal(last, 0)
        convert = time.perf_counter() - started
        started = time.perf_counter()
        ensure_universal(last, 0)
        cached = time.perf_counter() - started
        uni_size = sum(f.stat().st_size for f in universal.rglob("*") if f.is_file()) / 2**20
        print(f"model: {result['params']:,} parameters; 2 processes, ZeRO-1, gloo, 1 thread each")
        for kind, values in result["times"].items():
            print(f"{kind} save: median {statistics.median(values):.3f} s over {len(values)}")
        print(f"final checkpoint size: {size:.1f} MiB (engine shards + model.safetensors + optimizer.safetensors)")
        print(f"universal conversion (once): {convert:.2f} s, {uni_size:.1f} MiB; cached call: {cached * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
