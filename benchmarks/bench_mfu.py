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
    # an A/B in one process: bf16_loop against bf16 on the same weights, steps alternating
    python benchmarks/bench_mfu.py --model ouro_1p4b --seq 4096 --compile --precision bf16_loop --versus precision=bf16
    # FP8 (the shared linears' GEMMs in float8; MFU still against the bf16 peak) against bf16_loop
    python benchmarks/bench_mfu.py --model ouro_1p4b --seq 4096 --compile --precision fp8 --versus precision=bf16_loop
    python benchmarks/bench_mfu.py --model ouro_1p4b --seq 65536 --attention flash --checkpointing layer
    # against a plain PyTorch Ouro (benchmarks/plain_ouro.py) on the same weights, alternating steps,
    # and where the GPU time of our step goes:
    python benchmarks/bench_mfu.py --model ouro_1p4b --seq 4096 --compile --baseline --profile
    # a CPU smoke run of the script itself:
    .venv/bin/python benchmarks/bench_mfu.py --model tiny --device cpu --seq 256 --steps 2 --warmup 1 \
        --baseline --profile
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import plain_ouro
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
from ouro_train.train.profiling import breakdown

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "model"


def model_config(name: str, **overrides) -> ModelConfig:
    fields = OmegaConf.to_container(OmegaConf.load(RECIPES / f"{name}.yaml"))
    return ModelConfig(**(fields | {k: v for k, v in overrides.items() if v is not None}))


def profile_kinds(train_step, device: torch.device) -> None:
    """One profiled step: time by kind of kernel (CUDA) or op (CPU), and the idle rest of the step
    (ouro_train/train/profiling.py, the breakdown `ouro-train` writes with logging.profile_start)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        train_step()
        sync(device)
        wall_us = (time.perf_counter() - started) * 1e6
    print("\n".join(breakdown(prof.events(), wall_us, device.type).lines("profile of one step")))


def resident_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes a model keeps between steps: parameters, buffers and optimizer state (several models may
    be resident at once, so the device's own peak would count the others too)."""
    tensors = {t.data_ptr(): t for t in (*module.parameters(), *module.buffers())}
    for state in optimizer.state.values():
        tensors.update({t.data_ptr(): t for t in state.values() if isinstance(t, torch.Tensor)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


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
    parser.add_argument("--checkpointing", default="none", choices=["none", "selective", "layer", "step"])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "bf16_loop", "fp8"], help="train.precision")
    parser.add_argument("--chunk", type=int, default=4096, help="tokens per CE chunk")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also train a plain PyTorch Ouro (benchmarks/plain_ouro.py) on the same weights, steps alternating",
    )
    parser.add_argument(
        "--versus",
        default=None,
        metavar="KEY=VALUE",
        help="also train our model with one setting changed (precision=bf16, kernels=triton, attention=flex, "
        "checkpointing=none), "
        "on the same weights, steps alternating: an A/B in one process",
    )
    parser.add_argument("--profile", action="store_true", help="print one step's device time by kind")
    args = parser.parse_args()
    versus_key, _, versus_value = (args.versus or "=").partition("=")
    choices = {
        "precision": ("bf16", "bf16_loop", "fp8"),
        "kernels": ("torch", "triton"),
        "attention": ("sdpa", "flex", "flash"),
        "checkpointing": ("none", "selective", "layer", "step"),
    }
    if args.versus and versus_value not in choices.get(versus_key, ()):
        raise SystemExit(f"--versus takes KEY=VALUE, one of {choices}; got {args.versus!r}")
    versus_precision = versus_value if versus_key == "precision" else args.precision
    versus_checkpointing = versus_value if versus_key == "checkpointing" else args.checkpointing

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
    plain = plain_ouro.plain_from(model) if args.baseline else None
    other = None
    if args.versus:  # the same weights, before any wrapping
        same_model = versus_key in ("precision", "checkpointing")
        other_cfg = cfg if same_model else model_config(args.model, **(overrides | {versus_key: versus_value}))
        with torch.device(device):
            other = LoopLM(other_cfg)
        other.load_state_dict(model.state_dict())
    tokens_per_step = args.micro_batch * args.seq
    ids = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq + 1), device=device)
    doc_ids = (torch.arange(args.seq, device=device) // -(-args.seq // args.docs)).expand(args.micro_batch, -1)
    doc_ids = doc_ids if args.docs > 1 else None

    optimizers: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] = {}  # for resident memory

    def our_step(
        model: LoopLM, precision: str, checkpointing: str
    ) -> tuple[LoopLM, torch.optim.Optimizer, Callable[[], float]]:
        """`model` wrapped as the trainer would for `precision` and `checkpointing`, and one training
        step of it."""
        if precision in ("bf16_loop", "fp8"):
            model = apply_loop_precision(model, fp8=precision == "fp8")
        model = apply_activation_checkpointing(model, checkpointing)
        cache = checkpointing != "selective"  # as the trainer: selective checkpointing replays the casts
        if args.compile:
            model = apply_compile(model)
        optimizer = build_optimizer(model, OptimConfig())

        def train_step() -> float:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache):
                output = model(ids[:, :-1], doc_ids=doc_ids)
                loss = looplm_loss(output, model.lm_head, ids[:, 1:], beta=0.05, chunk_size=args.chunk).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())

        return model, optimizer, train_step

    model, optimizer, train_step = our_step(model, args.precision, args.checkpointing)
    steps = {"ours": train_step}
    optimizers["ours"] = (model, optimizer)
    if other is not None:
        other, other_optimizer, steps["versus"] = our_step(other, versus_precision, versus_checkpointing)
        optimizers["versus"] = (other, other_optimizer)
    if plain is not None:
        if args.docs > 1:
            raise SystemExit("--baseline trains unpacked rows (the plain model has no document mask): drop --docs")
        if args.compile:
            for layer in plain.model.layers:
                layer.compile()
        plain_optimizer = torch.optim.AdamW(plain.parameters(), lr=OptimConfig().lr, fused=True)

        def plain_step() -> float:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                logits, gates = plain(ids[:, :-1])
                loss = plain_ouro.plain_loss(logits, gates, ids[:, 1:], beta=0.05)
            loss.backward()
            plain_optimizer.step()
            plain_optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())

        steps["plain"] = plain_step
        optimizers["plain"] = (plain, plain_optimizer)

    first_loss = {name: step() for name, step in steps.items()}  # step 1, from the same weights
    started = time.perf_counter()
    for _ in range(args.warmup - 1):
        for step in steps.values():
            step()
    sync(device)
    warmup_s = time.perf_counter() - started
    times: dict[str, list[float]] = {name: [] for name in steps}
    peak: dict[str, float] = {name: 0.0 for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
            if device.type == "cuda":  # this model's own: its step's peak above the start, plus its resident state
                own = torch.cuda.max_memory_allocated() - before + resident_bytes(*optimizers[name])
                peak[name] = max(peak[name], own / 2**30)
    step_s = statistics.median(times["ours"])
    flops = count_model(cfg, args.seq).train_flops_per_token
    tokens_per_s = tokens_per_step / step_s
    achieved = flops * tokens_per_s / 1e12
    peak_flops = peak_tflops(args.peak_tflops, device.type)
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
        + (
            f"; MFU {achieved / peak_flops:.1%} of {peak_flops:g} TFLOP/s"
            if peak_flops
            else "; MFU: device peak unknown"
        )
    )
    if device.type == "cuda":
        print(f"peak memory {peak['ours']:.1f} GiB (the step's peak above its start, plus the model's resident state)")
    if other is not None:
        versus_s = statistics.median(times["versus"])
        print(
            f"versus (ours, {args.versus}): step {versus_s * 1e3:.1f} ms, tokens/s "
            f"{tokens_per_step / versus_s:,.0f}, MFU "
            + (f"{flops * tokens_per_step / versus_s / 1e12 / peak_flops:.1%}" if peak_flops else "?")
            + f"; first loss {first_loss['versus']:.5f} (ours {first_loss['ours']:.5f})"
        )
        ours_setting = {
            "precision": args.precision,
            "kernels": args.kernels,
            "attention": args.attention,
            "checkpointing": args.checkpointing,
        }
        setting = f"{versus_key} {ours_setting.get(versus_key)}/{versus_value}"
        line = f"ours/versus ({setting}) tokens/s {versus_s / step_s:.3f}x"
        if device.type == "cuda":
            line += f"; peak memory {peak['ours']:.1f} / {peak['versus']:.1f} GiB"
        print(line)
    if plain is not None:
        plain_s = statistics.median(times["plain"])
        print(
            f"baseline (plain PyTorch Ouro, per-step full logits, compile {args.compile}): "
            f"step {plain_s * 1e3:.1f} ms, "
            f"tokens/s {tokens_per_step / plain_s:,.0f}; first loss ours {first_loss['ours']:.5f}, "
            f"plain {first_loss['plain']:.5f}"
        )
        line = f"ours/baseline tokens/s {plain_s / step_s:.3f}x"
        if device.type == "cuda":
            line += f"; peak memory {peak['ours']:.1f} / {peak['plain']:.1f} GiB = {peak['ours'] / peak['plain']:.2f}x"
        print(line)
    if args.profile:
        profile_kinds(train_step, device)


if __name__ == "__main__":
    main()
