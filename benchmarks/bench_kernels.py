"""Forward + backward time of each `model.kernels` op: torch eager vs torch.compile vs Triton.

Ops: rms_norm, rms_norm + residual (the sandwich norm-and-add), swiglu, rope, at Ouro's widths by
default on CUDA (4096 tokens x hidden 2048, intermediate 5632, 16 heads x 128 head dim; the norm
weight in fp32 as under bf16 autocast, the residual stream in the norm output's dtype). Each
figure is the median of --repeats timed runs after --warmup runs (which also absorb compilation).
The last columns give the largest |difference| from eager of the output, and the peak memory
(CUDA) of one forward + backward.

    python benchmarks/bench_kernels.py --device cuda --dtype bf16
    python benchmarks/bench_kernels.py --device cpu     # eager vs compile only, small shapes

Triton kernels need a CUDA device: on CPU the triton column is skipped (Triton's interpreter,
which the tests use on CPU, is far too slow to time).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from ouro_train.kernels.rms_norm import rms_norm
from ouro_train.kernels.rope import apply_rope
from ouro_train.kernels.swiglu import swiglu

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OURO = {"tokens": 4096, "hidden": 2048, "intermediate": 5632, "heads": 16, "head_dim": 128}
CPU_SMALL = {"tokens": 512, "hidden": 256, "intermediate": 704, "heads": 4, "head_dim": 64}


def build_ops(shape: dict, dtype: torch.dtype, device: torch.device) -> dict[str, tuple[Callable, list]]:
    """name -> (fn(*inputs, backend) -> output, the inputs, which need grad). backend="torch" is
    the plain torch reference (eager, or what torch.compile compiles)."""
    gen = torch.Generator().manual_seed(0)

    def randn(*size, dt=dtype):
        return torch.randn(*size, generator=gen).to(device, dt).requires_grad_()

    tokens, hidden = shape["tokens"], shape["hidden"]
    norm_out_dtype = torch.promote_types(torch.float32, dtype)  # fp32 weight x activations
    x, weight = randn(tokens, hidden), randn(hidden, dt=torch.float32)
    residual = randn(tokens, hidden, dt=norm_out_dtype)
    gate, up = randn(tokens, shape["intermediate"]), randn(tokens, shape["intermediate"])
    heads, head_dim = shape["heads"], shape["head_dim"]
    # q as the model makes it: (1, S, N, D) projection viewed as (1, N, S, D).
    q = torch.randn(1, tokens, heads, head_dim, generator=gen).to(device, dtype).transpose(1, 2).requires_grad_()
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.arange(tokens, dtype=torch.float32)[None, :, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1).to(device)  # (1, S, D)
    cos, sin = emb.cos(), emb.sin()

    return {
        "rms_norm": (lambda x, w, backend: rms_norm(x, w, 1e-6, backend=backend), [x, weight]),
        "rms_norm+residual": (
            lambda x, w, r, backend: rms_norm(x, w, 1e-6, residual=r, backend=backend),
            [x, weight, residual],
        ),
        "swiglu": (swiglu, [gate, up]),
        "rope": (lambda q, backend: apply_rope(q, cos, sin, backend), [q]),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fwd_bwd(
    fn: Callable, inputs: list, device: torch.device, warmup: int, repeats: int
) -> tuple[float, float, torch.Tensor]:
    """-> (median ms, peak MiB or nan, output of the last run)."""
    out = fn(*inputs)
    upstream = torch.randn_like(out)

    def step():
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, upstream)
        return out

    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = step()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return statistics.median(times), peak, out.detach()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    for key in OURO:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"default {OURO[key]} on CUDA")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    defaults = OURO if device.type == "cuda" else CPU_SMALL
    shape = {key: getattr(args, key) or default for key, default in defaults.items()}
    variants = ["eager"] + ([] if args.no_compile else ["compile"])
    if device.type == "cuda":
        variants.append("triton")
        print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}", end="")
        import triton

        print(f", triton {triton.__version__}")
    else:
        print("Triton kernels need a CUDA device: timing torch eager vs torch.compile only, at small shapes.")
    print(f"shapes: {shape}; activations {args.dtype}, norm weight fp32; median of {args.repeats} fwd+bwd runs\n")

    header = f"{'op':<18}" + "".join(f"{v + ' ms':>12}" for v in variants)
    header += "".join(f"{'x eager ' + v:>18}" for v in variants[1:]) + f"{'max |diff|':>12}" + f"{'peak MiB':>10}"
    print(header)
    for name, (fn, inputs) in build_ops(shape, dtype, device).items():
        results = {}
        for variant in variants:
            backend = "triton" if variant == "triton" else "torch"
            call = (lambda f, b: lambda *xs: f(*xs, backend=b))(fn, backend)  # binds this variant's backend
            if variant == "compile":
                call = torch.compile(call, dynamic=False)
            try:
                results[variant] = time_fwd_bwd(call, inputs, device, args.warmup, args.repeats)
            except Exception as error:  # noqa: BLE001 (one failing variant must not hide the others)
                print(f"{name}: {variant} failed: {type(error).__name__}: {error}", file=sys.stderr)
        row = f"{name:<18}" + "".join(
            f"{results[v][0]:>12.3f}" if v in results else f"{'failed':>12}" for v in variants
        )
        for v in variants[1:]:
            ok = v in results and "eager" in results
            row += f"{results['eager'][0] / results[v][0]:>18.2f}" if ok else f"{'-':>18}"
        last = variants[-1]
        diff = (
            (results[last][2].float() - results["eager"][2].float()).abs().max().item()
            if last in results and "eager" in results
            else float("nan")
        )
        row += f"{diff:>12.3g}" + f"{results[last][1] if last in results else float('nan'):>10.1f}"
        print(row, flush=True)
    print(f"\nmax |diff| and peak MiB: the {variants[-1]} column against eager.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
