"""Generation figures on a trained checkpoint (CPU by default): what the cache and the early exit buy.

    python benchmarks/bench_generate.py                       # the demo pipeline's last checkpoint
    python benchmarks/bench_generate.py --model runs/x/checkpoints/step_N --data runs/x/data/pretrain_val

1. Cached decoding vs recomputing the prefix for every token (what sampling cost before
   ouro_train.inference), greedy, all steps, batch 1: tokens/s at 256 and 1,024 new tokens.
2. Q-exit, q in {0.3, 0.5, 0.7, 0.9, 1.0}: mean recurrent steps used, wall-clock per generated token
   (batch 1, median of --repeats), and held-out perplexity under the real exit (`evaluate`: token
   by token, skipped steps not computed) against all steps.
3. KV-cache bytes per token for each policy, at this model's size and at Ouro-1.4B's (bf16).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from ouro_train.config.store import compose_config
from ouro_train.inference import generate, generate_uncached
from ouro_train.inference.documents import shard_documents
from ouro_train.inference.evaluate import evaluate, kv_bytes_per_token
from ouro_train.inference.kv_cache import KV_POLICIES
from ouro_train.inference.loading import load_model


def latest_demo_checkpoint(run: Path) -> Path:
    """The final checkpoint of the last training stage of a demo pipeline run."""
    for stage in ("gate_training", "sft", "midtrain"):
        checkpoints = sorted((run / stage / "checkpoints").glob("step_*"))
        if checkpoints:
            return checkpoints[-1]
    raise SystemExit(f"no checkpoint under {run}: run `make demo` first, or pass --model")


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        began = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/demo_pipeline"))
    parser.add_argument("--model", type=Path, help="default: the demo run's last checkpoint")
    parser.add_argument("--data", type=Path, help="held-out shards (default: <run>/data/pretrain_val)")
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or latest_demo_checkpoint(args.run)
    data = args.data or args.run / "data" / "pretrain_val"
    model = load_model(path)
    cfg = model.config
    print(
        f"model {path}: {cfg.num_layers} layers x {cfg.recurrent_steps} steps, hidden {cfg.hidden_size}, "
        f"{model.num_parameters():,} parameters; {torch.get_num_threads()} thread(s)"
    )
    docs = shard_documents(data, args.documents, args.max_tokens, cfg.vocab_size)
    prompt = docs[0].tokens[:16][None]

    print("\n1. cached decoding vs recomputing the prefix (greedy, all steps, batch 1)")
    print("| new tokens | cached tok/s | recompute tok/s | speed-up | same tokens |")
    print("|---|---|---|---|---|")
    for new in (256, 1024):
        cached_s, cached = timed(lambda n=new: generate(model, prompt, max_new_tokens=n), args.repeats)
        plain_s, plain = timed(lambda n=new: generate_uncached(model, prompt, n), 1)
        same = cached.tokens.tolist() == plain.tolist()
        print(f"| {new} | {new / cached_s:.1f} | {new / plain_s:.1f} | {plain_s / cached_s:.1f}x | {same} |")

    print(
        f"\n2. Q-exit (generation: batch 1, 256 new tokens, median of {args.repeats}; perplexity: "
        f"{len(docs)} held-out documents of <= {args.max_tokens} tokens, real exit, KV full)"
    )
    qs = (0.3, 0.5, 0.7, 0.9, 1.0)
    result = evaluate(model, docs, qs, ("full", "last"))
    runs = {(r["kv_policy"], r["exit"]): r for r in result["runs"]}
    all_s, _ = timed(lambda: generate(model, prompt, max_new_tokens=256), args.repeats)
    print(
        "| exit | mean steps (gen) | ms/token (gen) | vs all | mean steps (eval) | recurrent FLOPs saved "
        "| perplexity | change | change, KV last |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    base = runs["full", "all"]
    print(
        f"| all | {cfg.recurrent_steps:.2f} | {1e3 * all_s / 256:.2f} | 1.00 | {base['mean_steps']:.2f} | 0.0% "
        f"| {base['ppl']:.3f} | +0.00% | {runs['last', 'all']['ppl_change']:+.2%} |"
    )
    for q in qs:
        seconds, out = timed(
            lambda q=q: generate(model, prompt, max_new_tokens=256, exit_policy=f"q:{q}"), args.repeats
        )
        row, last = runs["full", f"q:{q:g}"], runs["last", f"q:{q:g}"]
        print(
            f"| q:{q:g} | {out.mean_steps():.2f} | {1e3 * seconds / 256:.2f} | {seconds / all_s:.2f} | "
            f"{row['mean_steps']:.2f} | {1 - row['step_fraction']:.1%} | {row['ppl']:.3f} | {row['ppl_change']:+.2%} "
            f"| {last['ppl_change']:+.2%} |"
        )

    print("\n3. KV cache per token (keys + values, all layers and steps the policy keeps)")
    big = compose_config(["model=ouro_1p4b"]).model
    print("| policy | this model, fp32 | Ouro-1.4B, bf16 | Ouro-1.4B, 32K context |")
    print("|---|---|---|---|")
    for policy in KV_POLICIES:
        small = kv_bytes_per_token(cfg, policy, torch.float32)
        large = kv_bytes_per_token(big, policy, torch.bfloat16)
        print(f"| {policy} | {small:,} B | {large / 2**10:,.0f} KiB | {large * 32768 / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
