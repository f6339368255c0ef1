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

    .venv/bin/python benchmarks/bench_loss_memory.py [--tokens 2048 --vocab 49152 --hidden 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VARIANTS = ("baseline", "naive", "stepwise", "fused", "naive_one_step", "linear_ce_one_step")


def run_variant(variant: str, tokens: int, vocab: int, hidden: int, steps: int, chunk: int) -> dict:
    import torch
    import torch.nn.functional as F

    from ouro_train.kernels.linear_cross_entropy import linear_cross_entropy
    from ouro_train.model.looplm import LoopOutput
    from ouro_train.model.objective import exit_log_distribution, looplm_loss

    torch.manual_seed(0)
    hs = [torch.randn(1, tokens, hidden, requires_grad=True) for _ in range(steps)]
    gates = torch.randn(steps, 1, tokens, requires_grad=True)
    head = torch.randn(vocab, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens))
    beta = 0.05
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if variant == "fused":
        loss = looplm_loss(LoopOutput(hs, gates), head, labels, beta=beta, chunk_size=chunk).loss
    elif variant == "stepwise":
        log_p = exit_log_distribution(gates.flatten(1))  # (R, T)
        p = log_p.exp()
        ce = torch.stack([linear_cross_entropy(h[0], head, labels[0], chunk_size=chunk) for h in hs])  # (R, T)
        loss = ((p * ce).sum(0) + beta * (p * log_p).sum(0)).mean()
    elif variant == "naive":
        logits = torch.stack([h @ head.T for h in hs])  # (R, 1, T, V): every step's logits at once
        ce = F.cross_entropy(logits.flatten(0, 2), labels.repeat(steps, 1, 1).flatten(), reduction="none")
        ce = ce.view(steps, 1, tokens)
        log_p = exit_log_distribution(gates)
        p = log_p.exp()
        loss = ((p * ce).sum(0) + beta * (p * log_p).sum(0)).mean()
    elif variant == "naive_one_step":
        loss = F.cross_entropy(hs[0][0] @ head.T, labels[0])
    elif variant == "linear_ce_one_step":
        loss = linear_cross_entropy(hs[0][0], head, labels[0], chunk_size=chunk).mean()
    else:  # baseline: inputs only
        loss = None
    if loss is not None:
        loss.backward()
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
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.tokens, args.vocab, args.hidden, args.steps, args.chunk)))
        return
    shape = f"R={args.steps} x {args.tokens} tokens x vocab {args.vocab}, hidden {args.hidden}"
    print(f"LoopLM loss, forward + backward, {shape}; chunk {args.chunk} tokens; median of {args.repeats} runs")
    one_step_logits_mb = args.tokens * args.vocab * 4 / 2**20
    all_steps_mb = args.steps * one_step_logits_mb
    print(f"(one step's fp32 logits would be {one_step_logits_mb:.0f} MB; all steps {all_steps_mb:.0f} MB)")
    results: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--variant", variant] + [
                f"--{k}={getattr(args, k)}" for k in ("tokens", "vocab", "hidden", "steps", "chunk")
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results.setdefault(variant, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  run: {variant} {results[variant][-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    base = median([r["peak_rss_mb"] for r in results["baseline"]])
    rows = {}
    for variant in VARIANTS[1:]:
        rows[variant] = (
            median([r["peak_rss_mb"] for r in results[variant]]) - base,
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
