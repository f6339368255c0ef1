"""Peak memory and time of the LoopLM loss's cross-entropy term, forward + backward.

    naive    every step's logits materialised at once (R x T x V), plain autograd
    stepwise linear_cross_entropy once per step (the path before the fused objective): each
             call recomputes its logits in backward and returns its own (V, H) weight gradient
    fused    looplm_loss: exit_weighted_cross_entropy, all steps in one pass, gradients
             computed in forward (3 matmuls per chunk, one fp32 weight-gradient buffer)
    one-step rows: one linear_cross_entropy call vs one step's naive CE

Each variant runs in a fresh subprocess and reports its peak resident memory (ru_maxrss) above
a baseline process that only builds the inputs, so the numbers are the loss's own footprint.
Variants run interleaved, `--repeats` rounds; medians are reported.

`--device cuda` (#22 item 3: the fused objective against per-step logits on the GPU): each
variant warms up once (kernel selection, Triton compilation), then times `--iters` passes between
device synchronisations (their median); its memory is torch's CUDA peak above the inputs.
`--dtype bf16` makes the hidden states and the head bf16 (the GEMMs' operands under autocast).

    .venv/bin/python benchmarks/bench_loss_memory.py [--tokens 2048 --vocab 49152 --hidden 256]
    python benchmarks/bench_loss_memory.py --device cuda --dtype bf16 --tokens 4096 --hidden 2048 --chunk 4096
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VARIANTS = ("baseline", "naive", "stepwise", "fused", "naive_one_step", "linear_ce_one_step")
ITERS = 5  # timed passes per CUDA subprocess (set by --iters)


def run_variant(
    variant: str, tokens: int, vocab: int, hidden: int, steps: int, chunk: int, device: str = "cpu", dtype: str = "fp32"
) -> dict:
    import torch
    import torch.nn.functional as F

    from ouro_train.kernels.linear_cross_entropy import linear_cross_entropy
    from ouro_train.model.looplm import LoopOutput
    from ouro_train.model.objective import exit_log_distribution, looplm_loss

    torch.manual_seed(0)
    kind = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    make = lambda *shape, dtype=kind: torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)  # noqa: E731
    hs = [make(1, tokens, hidden) for _ in range(steps)]
    gates = make(steps, 1, tokens, dtype=torch.float32)
    head = make(vocab, hidden)
    labels = torch.randint(0, vocab, (1, tokens), device=device)
    beta = 0.05

    def loss_of() -> torch.Tensor | None:
        if variant == "fused":
            return looplm_loss(LoopOutput(hs, gates), head, labels, beta=beta, chunk_size=chunk).loss
        if variant == "stepwise":
            log_p = exit_log_distribution(gates.flatten(1))  # (R, T)
            p = log_p.exp()
            ce = torch.stack([linear_cross_entropy(h[0], head, labels[0], chunk_size=chunk) for h in hs])  # (R, T)
            return ((p * ce).sum(0) + beta * (p * log_p).sum(0)).mean()
        if variant == "naive":
            logits = torch.stack([h @ head.T for h in hs])  # (R, 1, T, V): every step's logits at once
            ce = F.cross_entropy(
                logits.flatten(0, 2).float(), labels.repeat(steps, 1, 1).flatten(), reduction="none"
            ).view(steps, 1, tokens)
            log_p = exit_log_distribution(gates)
            p = log_p.exp()
            return ((p * ce).sum(0) + beta * (p * log_p).sum(0)).mean()
        if variant == "naive_one_step":
            return F.cross_entropy((hs[0][0] @ head.T).float(), labels[0])
        if variant == "linear_ce_one_step":
            return linear_cross_entropy(hs[0][0], head, labels[0], chunk_size=chunk).mean()
        return None  # baseline: inputs only

    def run() -> None:
        loss = loss_of()
        if loss is not None:
            loss.backward()
        for t in (*hs, gates, head):
            t.grad = None

    if device == "cuda":
        run()  # warm-up: kernel selection, Triton compilation
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        inputs = torch.cuda.memory_allocated()
        times = []
        for _ in range(ITERS):
            start = time.perf_counter()
            run()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated() - inputs) / 2**20
        return {"variant": variant, "seconds": sorted(times)[len(times) // 2], "peak_mb": peak}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    run()
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "seconds": elapsed, "peak_rss_mb": peak / 1024, "base_rss_mb": base / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="hidden states and head")
    parser.add_argument("--iters", type=int, default=5, help="CUDA: timed passes per run (their median)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global ITERS
    ITERS = args.iters
    options = ("tokens", "vocab", "hidden", "steps", "chunk", "device", "dtype", "iters")
    if args.variant:
        sizes = (args.tokens, args.vocab, args.hidden, args.steps, args.chunk, args.device, args.dtype)
        print(json.dumps(run_variant(args.variant, *sizes)))
        return
    shape = f"R={args.steps} x {args.tokens} tokens x vocab {args.vocab}, hidden {args.hidden}, {args.dtype}"
    print(
        f"LoopLM loss, forward + backward on {args.device}, {shape}; chunk {args.chunk} tokens; "
        f"median of {args.repeats} runs"
        + (f" (each the median of {args.iters} passes)" if args.device == "cuda" else "")
    )
    one_step_logits_mb = args.tokens * args.vocab * 4 / 2**20
    all_steps_mb = args.steps * one_step_logits_mb
    print(f"(one step's fp32 logits would be {one_step_logits_mb:.0f} MB; all steps {all_steps_mb:.0f} MB)")
    results: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--variant", variant] + [f"--{k}={getattr(args, k)}" for k in options]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results.setdefault(variant, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  run: {variant} {results[variant][-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    cuda = args.device == "cuda"  # there each run measures its own peak above its inputs
    base = 0.0 if cuda else median([r["peak_rss_mb"] for r in results["baseline"]])
    peak = "peak_mb" if cuda else "peak_rss_mb"
    rows = {}
    for variant in VARIANTS[1:]:
        rows[variant] = (
            median([r[peak] for r in results[variant]]) - base,
            median([r["seconds"] for r in results[variant]]),
        )
        every = ", ".join(f"{r['seconds']:.1f}" for r in results[variant])
        print(
            f"{variant:18s} peak memory above inputs {rows[variant][0]:8.0f} MB   "
            f"time {rows[variant][1]:6.2f} s   (runs: {every} s)"
        )
    print(
        f"all steps: fused/naive time {rows['fused'][1] / rows['naive'][1]:.2f}x, "
        f"fused/stepwise time {rows['fused'][1] / rows['stepwise'][1]:.2f}x; "
        f"memory naive/fused {rows['naive'][0] / max(rows['fused'][0], 1):.1f}x, "
        f"stepwise/fused {rows['stepwise'][0] / max(rows['fused'][0], 1):.1f}x"
    )
    print(f"one step: linear_ce/naive time {rows['linear_ce_one_step'][1] / rows['naive_one_step'][1]:.2f}x")


if __name__ == "__main__":
    main()
