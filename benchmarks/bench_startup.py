"""Peak host memory of start-up per rank: the model built and the DeepSpeed engine initialised,
no training step. 2 gloo processes, ZeRO-3, the real ouro_1p4b shape (1,434,652,673 parameters,
5.7 GB per full fp32 copy).

    old  every rank builds the full model (torch.manual_seed; LoopLM), then deepspeed.initialize
         partitions it (what run_stage did before parallel/materialize.py)
    new  parallel/materialize.py build_model: built under deepspeed.zero.Init, each parameter
         filled alone (what run_stage does now)

The stage II objective (`--objective gate`, the default) freezes everything but the exit gate, so
the optimizer states are the gate's alone: ZeRO-3 creates Adam's moments and gradient partitions
at initialisation (about 4 bytes x 3 x parameters / ranks more per rank, the same in both paths),
which for 1.4B on 2 ranks does not fit a 23 GiB box beside the model. `--objective stage1` measures
that too where memory allows.

Memory: the peak resident set of each rank, as VmHWM (/proc/self/status) and ru_maxrss
(getrusage(RUSAGE_SELF)); both include the Python/torch/DeepSpeed runtime (~0.5-1 GB).

    .venv/bin/python benchmarks/bench_startup.py [--path old|new|both] [--model ouro_1p4b]

Measured on this project's CPU machine (2 cores, 23 GiB; torch 2.13 CPU, deepspeed 0.19.8),
ouro_1p4b, ZeRO-3 on 2 gloo processes, objective gate, one run of each path (`--path old`, then
`--path new`; the machine shared with other jobs, so the times are loose):
    old  rank 0: 6.23 GB, rank 1: 6.28 GB peak RSS (VmHWM = ru_maxrss); build 103 s, start-up 128 s
    new  rank 0: 4.86 GB, rank 1: 4.29 GB peak RSS (VmHWM = ru_maxrss); build 127 s, start-up 131 s
The old peak is the full model (5.74 GB) plus the runtime (~0.5 GB). The new one is this rank's
ZeRO-3 partition (2.87 GB) plus the runtime plus transients: the largest parameters (embedding and
head, 0.4 GB each) gathered whole one at a time, on rank 0 also computed whole, and heap that glibc
keeps after zero.Init frees each module's full parameters (build_model trims it; before that trim
the same run peaked at 5.57 / 4.92 GB). At 8 ranks the partition is 1/8 of the model, so the saving
grows with the data-parallel size; the peak per rank stays at least partition + runtime + ~0.8 GB.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch


def peak_rss() -> dict:
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return {
        "vm_hwm_gb": hwm / 2**20,
        "ru_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
    }


def start_up(model_name: str, path: str, objective: str) -> dict:
    from ouro_train.config.resolve import resolve
    from ouro_train.config.store import compose_config
    from ouro_train.model import LoopLM
    from ouro_train.parallel import build_model, destroy_parallel, init_parallel, parallelize
    from ouro_train.train.trainer import freeze_for_objective

    torch.set_num_threads(1)  # one core per process: 2 processes on a 2-core machine
    cfg = compose_config(
        [
            f"model={model_name}",
            "parallel.zero_stage=3",
            "train.device=cpu",
            "train.micro_batch_size=1",
            "train.global_batch_tokens=2048",
            "train.seq_len=1024",
            f"objective.kind={objective}",
        ]
    )
    layout = init_parallel(cfg.parallel, cfg.model, "cpu")
    resolved = resolve(cfg, layout.dp)
    began = time.perf_counter()
    try:
        if path == "old":
            torch.manual_seed(cfg.train.seed)
            model, weights = LoopLM(cfg.model), None
        else:
            model, weights = build_model(cfg, layout, resolved)
        built = time.perf_counter() - began
        after_build = peak_rss()
        freeze_for_objective(model, cfg.objective.kind)
        parallelize(model, cfg, layout, resolved, weights)
        return {"build_s": built, "start_up_s": time.perf_counter() - began, "after_build": after_build} | peak_rss()
    finally:
        destroy_parallel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", choices=["old", "new", "both"], default="both")
    parser.add_argument("--model", default="ouro_1p4b")
    parser.add_argument("--objective", choices=["gate", "stage1"], default="gate")
    args = parser.parse_args()
    from ouro_train.parallel.testing import run_distributed

    for path in ["old", "new"] if args.path == "both" else [args.path]:
        results = run_distributed(start_up, 2, args.model, path, args.objective, timeout=1800)
        for rank, r in enumerate(results):
            print(
                f"{path} rank {rank}: peak RSS after start-up {r['vm_hwm_gb']:.2f} GB (VmHWM), "
                f"{r['ru_maxrss_gb']:.2f} GB (ru_maxrss); "
                f"after the model build {r['after_build']['vm_hwm_gb']:.2f} GB; "
                f"build {r['build_s']:.1f} s, start-up {r['start_up_s']:.1f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
