"""Training-step throughput, MFU and peak memory of a LoopLM on one device.

One process, no DeepSpeed: fp32 parameters, bf16 autocast (train.precision=bf16, or with
`--precision bf16_loop` the shared linears' bf16 copies made once per optimizer step and their
weight gradients accumulated in fp32 by the GEMMs), torch AdamW (the trainer's optimizer, fused),
the stage-I objective over all R steps. FLOPs per token are
ouro_train/model/flops.py's: every matmul of all R recurrent steps and the LM head at every step,
attention in the non-causal convention (PaLM / Megatron MFU), x3 for training; recomputation is
not counted. MFU = achieved FLOP/s / the device's dense bf16 peak (train/callbacks.py PEAK_TFLOPS).

    # Ouro-1.4B, R=4, seq 4K, best settings, then LongCT's 64K with activation checkpointing:
    python benchmarks/bench_mfu.py --model ouro_1p4b --seq 4096 --attention flash --kernels triton --compile
    python benchmarks/bench_mfu.py --model ouro_1p4b --seq 4096 --compile --precision bf16_loop
    python benchmarks/bench_mfu.py --model ouro_1p4b --seq 65536 --attention flash --checkpointing layer
    # a CPU smoke run of the script itself:
    .venv/bin/python benchmarks/bench_mfu.py --model tiny --device cpu --seq 256 --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ouro_train.config.schema import ModelConfig, OptimConfig
from ouro_train.model.flops import count_model
from ouro_train.model.looplm import LoopLM
from ouro_train.model.objective import looplm_loss
from ouro_train.optim.optimizer import build_optimizer
from ouro_train.parallel.checkpointing import apply_activation_checkpointing, apply_compile
from ouro_train.parallel.precision import apply_loop_precision
from ouro_train.train.callbacks import peak_tflops

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "model"


def model_config(name: str, **overrides) -> ModelConfig:
    fields = OmegaConf.to_container(OmegaConf.load(RECIPES / f"{name}.yaml"))
    return ModelConfig(**(fields | {k: v for k, v in overrides.items() if v is not None}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ouro_1p4b", help="a recipes/model/*.yaml name")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--docs", type=int, default=1, help="documents packed per row")
    parser.add_argument("--recurrent-steps", type=int, default=None)
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "flex", "flash"])
    parser.add_argument("--kernels", default="torch", choices=["torch", "triton"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--checkpointing", default="none", choices=["none", "layer", "step"])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "bf16_loop"], help="train.precision")
    parser.add_argument("--chunk", type=int, default=4096, help="tokens per CE chunk")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None)
    args = parser.parse_args()

    overrides = {"attention": args.attention, "recurrent_steps": args.recurrent_steps}
    if "kernels" in ModelConfig.__dataclass_fields__:
        overrides["kernels"] = args.kernels
    elif args.kernels != "torch":
        raise SystemExit("this checkout has no model.kernels option")
    cfg = model_config(args.model, **overrides)
    device = torch.device(args.device)
    torch.manual_seed(0)
    with torch.device(device):
        model = LoopLM(cfg)
    if args.precision == "bf16_loop":
        model = apply_loop_precision(model)
    model = apply_activation_checkpointing(model, args.checkpointing)
    if args.compile:
        model = apply_compile(model)
    optimizer = build_optimizer(model, OptimConfig())
    tokens_per_step = args.micro_batch * args.seq
    ids = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq + 1), device=device)
    doc_ids = (torch.arange(args.seq, device=device) // -(-args.seq // args.docs)).expand(args.micro_batch, -1)
    doc_ids = doc_ids if args.docs > 1 else None

    def train_step() -> float:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            output = model(ids[:, :-1], doc_ids=doc_ids)
            loss = looplm_loss(output, model.lm_head, ids[:, 1:], beta=0.05, chunk_size=args.chunk).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    started = time.perf_counter()
    for _ in range(args.warmup):
        train_step()
    sync()
    warmup_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        train_step()
        sync()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    flops = count_model(cfg, args.seq).train_flops_per_token
    tokens_per_s = tokens_per_step / step_s
    achieved = flops * tokens_per_s / 1e12
    peak = peak_tflops(args.peak_tflops, device.type)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"{name}: {cfg.name} ({model.num_parameters():,} parameters) R={cfg.recurrent_steps} seq {args.seq} x "
        f"micro-batch {args.micro_batch}, {args.docs} document(s) per row, precision {args.precision}, attention "
        f"{args.attention}, kernels {args.kernels}, compile {args.compile}, checkpointing {args.checkpointing}"
    )
    print(f"warm-up ({args.warmup} steps, compilation included): {warmup_s:.1f} s")
    print(f"step time (median of {args.steps}): {step_s * 1e3:.1f} ms; tokens/s {tokens_per_s:,.0f}")
    print(
        f"model FLOPs per token (train, all steps) {flops / 1e9:.2f} GFLOP; achieved {achieved:.1f} TFLOP/s"
        + (f"; MFU {achieved / peak:.1%} of {peak:g} TFLOP/s" if peak else "; MFU: device peak unknown")
    )
    if device.type == "cuda":
        print(f"peak memory allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
