"""Peak memory and time of attention forward + backward vs sequence length, per backend.

Packed rows: each row holds `--docs` documents of equal length (the loader's packing), so every
backend must keep attention inside documents. `dense` is the path before the backends: SDPA with
a (B, 1, S, S) boolean document-causal mask (which also forces SDPA's math kernel: scores S^2).

    CPU (tiny width, each case in a fresh process, peak RSS above the inputs):
        .venv/bin/python benchmarks/bench_attention.py
    GPU (Ouro shapes: 16 heads x 128, bf16; torch.cuda.max_memory_allocated above the inputs):
        python benchmarks/bench_attention.py --device cuda --heads 16 --head-dim 128 --dtype bf16

A case whose dense mask and scores alone would exceed `--max-gib` is not run; the table says so.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def backends_available(device: str) -> list[str]:
    names = ["sdpa"]
    if device == "cuda":
        names.append("flex")  # flex has no backward on CPU (torch 2.13)
        try:
            import flash_attn  # noqa: F401

            names.append("flash")
        except ImportError:
            print("(flash-attn not installed: the flash backend is left out)")
    return names + ["dense"]


def dense_gib(seq: int, heads: int, batch: int) -> float:
    """The dense path's own S^2 memory: the bool mask plus fp32 scores and probabilities."""
    return batch * seq * seq * (1 + 2 * 4 * heads) / 2**30


def run_case(args: argparse.Namespace) -> dict:
    from ouro_train.kernels.attention import attention, document_causal_mask, plan_attention

    device, dtype = torch.device(args.device), getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[args.dtype])
    seq, batch = args.seq, args.batch
    doc_ids = (torch.arange(seq, device=device) // -(-seq // args.docs)).expand(batch, seq)

    def make():
        shapes = [(batch, args.heads, seq, args.head_dim)] + [(batch, args.kv_heads, seq, args.head_dim)] * 2
        return [torch.randn(s, device=device, dtype=dtype, requires_grad=True) for s in shapes]

    def step(q, k, v, doc_ids):
        seq = q.shape[2]
        if args.backend == "dense":
            mask = document_causal_mask(doc_ids)
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, enable_gqa=args.kv_heads != args.heads
            )
        else:
            out = attention(q, k, v, plan_attention(args.backend, batch, seq, doc_ids))
        out.sum().backward()

    inputs = make()
    step(*(x[:, :, :128].detach().requires_grad_() for x in inputs), doc_ids[:, :128])  # warm-up: kernels, compile
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(args.repeats):
        for x in inputs:
            x.grad = None
        start = time.perf_counter()
        step(*inputs, doc_ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": statistics.median(times), "peak_mib": (peak - base) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--seqs", default="4096,8192,16384,32768,65536")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-gib", type=float, default=6.0)
    parser.add_argument("--backends", default=None, help="comma-separated; default: every available one")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.kv_heads = args.kv_heads or args.heads
    if args.case:
        print(json.dumps(run_case(args)))
        return
    backends = args.backends.split(",") if args.backends else backends_available(args.device)
    print(
        f"attention forward+backward, {args.device} {args.dtype}, batch {args.batch}, {args.heads} heads "
        f"({args.kv_heads} kv) x {args.head_dim}, {args.docs} documents per row; median of {args.repeats}"
    )
    print(f"{'seq':>7} {'backend':>7} {'time s':>9} {'peak MiB':>10}")
    for seq in [int(s) for s in args.seqs.split(",")]:
        for backend in backends:
            if backend == "dense" and dense_gib(seq, args.heads, args.batch) > args.max_gib:
                need = dense_gib(seq, args.heads, args.batch)
                print(f"{seq:>7} {backend:>7} {'not run':>9} {'> ' + format(need, '.0f') + ' GiB':>10}")
                continue
            command = [sys.executable, __file__, "--case", "1", f"--seq={seq}", f"--backend={backend}"] + [
                f"--{k.replace('_', '-')}={getattr(args, k)}"
                for k in ("device", "dtype", "heads", "kv_heads", "head_dim", "batch", "docs", "repeats")
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
                print(f"{seq:>7} {backend:>7} failed: {reason[:80]}")
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{seq:>7} {backend:>7} {result['seconds']:>9.3f} {result['peak_mib']:>10.0f}")


if __name__ == "__main__":
    main()
