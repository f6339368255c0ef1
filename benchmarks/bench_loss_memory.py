"""Peak memory and time of the LoopLM loss: step-wise chunked CE vs materialising all logits.

Each variant runs in a fresh subprocess and reports its peak resident memory (ru_maxrss) above
a baseline process that only builds the inputs, so the numbers are the loss's own footprint.

    .venv/bin/python benchmarks/bench_loss_memory.py [--tokens 2048 --vocab 49152 --hidden 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_variant(variant: str, tokens: int, vocab: int, hidden: int, steps: int, chunk: int) -> dict:
    import torch

    from ouro_train.model.looplm import LoopOutput
    from ouro_train.model.objective import looplm_loss

    torch.manual_seed(0)
    hs = [torch.randn(1, tokens, hidden, requires_grad=True) for _ in range(steps)]
    gates = torch.randn(steps, 1, tokens, requires_grad=True)
    head = torch.randn(vocab, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if variant == "chunked":
        loss = looplm_loss(LoopOutput(hs, gates), head, labels, beta=0.05, chunk_size=chunk).loss
    elif variant == "naive":
        logits = torch.stack([h @ head.T for h in hs])  # (R, 1, T, V): every step's logits at once
        ce = torch.nn.functional.cross_entropy(
            logits.flatten(0, 2), labels.repeat(steps, 1, 1).flatten(), reduction="none"
        ).view(steps, 1, tokens)
        lam = torch.sigmoid(gates)
        survive = torch.cumprod(1 - lam, dim=0)
        p = torch.cat([lam[:1], lam[1:-1] * survive[:-2], survive[-2:-1]], dim=0)
        loss = ((p * ce).sum(0) + 0.05 * (p * p.log()).sum(0)).mean()
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
        for variant in ("baseline", "chunked", "naive"):
            cmd = [sys.executable, __file__, "--variant", variant] + [
                f"--{k}={getattr(args, k)}" for k in ("tokens", "vocab", "hidden", "steps", "chunk")
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results.setdefault(variant, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    base = median([r["peak_rss_mb"] for r in results["baseline"]])
    rows = {}
    for variant in ("chunked", "naive"):
        rows[variant] = (
            median([r["peak_rss_mb"] for r in results[variant]]) - base,
            median([r["seconds"] for r in results[variant]]),
        )
        print(f"{variant:8s} peak memory above inputs {rows[variant][0]:8.0f} MB   time {rows[variant][1]:6.2f} s")
    print(
        f"memory ratio naive/chunked {rows['naive'][0] / max(rows['chunked'][0], 1):.1f}x, "
        f"time ratio chunked/naive {rows['chunked'][1] / rows['naive'][1]:.2f}x"
    )


if __name__ == "__main__":
    main()
