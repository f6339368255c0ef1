"""The markdown report of an `ouro-eval` result (eval.md: CE and perplexity per recurrent step,
the real early exit per KV policy and q, the reference's Q-exit, the cheapest setting within 1%
perplexity: `best_q_within`), and `write_outputs`, which writes it with eval.png (eval_plot.py)
and eval.json, the last one atomically, as the pipeline's done-marker of an eval stage.
"""

from __future__ import annotations

import json
from pathlib import Path

from ouro_train.inference.eval_plot import plot
from ouro_train.utils.atomic import atomic_write_text


def best_q_within(result: dict, loss: float = 0.01) -> dict | None:
    """The cheapest real Q-exit run (any KV policy) whose perplexity is at most `loss` worse."""
    fits = [r for r in result["runs"] if r["q"] is not None and r["ppl_change"] <= loss]
    return min(fits, key=lambda r: r["flops_per_token"], default=None)


def markdown(result: dict, title: str = "Exit evaluation") -> str:
    steps = len(result["per_step"])
    lines = [
        f"# {title}",
        "",
        f"{result['documents']} documents, {result['scored_tokens']:,} scored tokens, mean context "
        f"{result['mean_context']:.0f}; model {result['model']['name']} ({result['parameters']:,} parameters, "
        f"{result['model']['num_layers']} layers x {steps} steps).",
        "",
        "**Per recurrent step** (read out after step t; teacher-forced forward):",
        "",
        "| step | CE | perplexity | GFLOPs/token |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['step']} | {r['ce']:.4f} | {r['ppl']:.3f} | {r['flops_per_token'] / 1e9:.4f} |"
        for r in result["per_step"]
    ]
    lines += [
        "",
        "**Real early exit** (token-by-token decoding, the true next token fed back; skipped steps are",
        "not computed). Changes are against all steps with the first KV policy.",
        "",
        "| KV policy | exit | mean steps | recurrent FLOPs saved | perplexity | change | ms/token | exits per step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['kv_policy']} | {r['exit']} | {r['mean_steps']:.2f} | {1 - r['step_fraction']:.1%} | "
            f"{r['ppl']:.3f} | {r['ppl_change']:+.2%} | {1e3 * r['seconds_per_token']:.2f} | "
            f"{' / '.join(str(c) for c in r['exit_histogram'])} |"
        )
    lines += [
        "",
        "**The reference's Q-exit** (all steps computed, one step's logits picked: no saving):",
        "",
        "| q | mean steps picked | perplexity |",
        "|---|---|---|",
    ]
    lines += [f"| {r['q']:g} | {r['mean_steps']:.2f} | {r['ppl']:.3f} |" for r in result["reference_q_exit"]]
    best = best_q_within(result)
    lines += [
        "",
        "KV cache per token: " + ", ".join(f"{p} {b:,} B" for p, b in result["kv_cache_bytes_per_token"].items()) + ".",
    ]
    if best is None:
        lines.append("No Q-exit setting stays within 1% perplexity of all steps.")
    else:
        lines.append(
            f"Cheapest within 1% perplexity: {best['exit']} with KV policy {best['kv_policy']}: "
            f"{best['mean_steps']:.2f} of {steps} steps, {1 - best['step_fraction']:.1%} fewer recurrent-step FLOPs, "
            f"perplexity {best['ppl_change']:+.2%}."
        )
    lines += ["", "![quality vs compute, exit histogram](eval.png)", ""]
    return "\n".join(lines)


def write_outputs(result: dict, out: Path, title: str = "Exit evaluation") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / "eval.png")
    atomic_write_text(out / "eval.md", markdown(result, title))
    # Last, atomically: its presence means the evaluation is complete (the pipeline's done-marker).
    atomic_write_text(out / "eval.json", json.dumps(result, indent=1) + "\n")
    return out / "eval.json"
