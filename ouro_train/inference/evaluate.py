"""The evaluation `ouro-eval` runs: what the exit gate saves and what it costs, on held-out text.

For a model (loading.py: a checkpoint, imported weights or an exported HF directory) and held-out
documents (documents.py: a shard directory written by `ouro-data`, or a jsonl of {"text": ...} /
{"messages": [...]}), `evaluate` measures:

- cross-entropy / perplexity after each recurrent step (one teacher-forced forward: reading out
  after step t is exactly a model run for t steps);
- the reference's Q-exit (all R steps computed, one step's logits picked per token): the quality
  of the exit decisions alone, with no saving;
- the real Q-exit of `ouro_train.inference.generate`, for each q and KV policy: every document is
  decoded token by token with the true next token fed back (`score`), so later tokens see the
  cache the skipped steps left, exactly as in generation; mean steps used, FLOPs per token
  (`decode_flops_per_token`), wall-clock per token, an exit-step histogram.

Its result (a dict) becomes eval.json, eval.md and eval.png (quality vs compute; exit histogram)
through eval_report.py's `write_outputs`.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from ouro_train.config.schema import ModelConfig
from ouro_train.inference.documents import Document, scored_targets
from ouro_train.inference.generate import ExitPolicy, q_exit_steps, score
from ouro_train.inference.kv_cache import KV_POLICIES, LoopKVCache
from ouro_train.model.flops import decode_flops_per_token
from ouro_train.model.looplm import LoopLM

DEFAULT_Q = (0.3, 0.5, 0.7, 0.9, 1.0)


@torch.no_grad()
def evaluate(
    model: LoopLM,
    docs: list[Document],
    qs: tuple[float, ...] = DEFAULT_Q,
    kv_policies: tuple[str, ...] = ("full", "last"),
    batch_size: int = 16,
) -> dict:
    for policy in kv_policies:
        if policy not in KV_POLICIES:
            raise ValueError(f"kv policy {policy!r}: choose from {', '.join(KV_POLICIES)}")
    cfg = model.config
    steps = cfg.recurrent_steps
    device = model.model.embed_tokens.weight.device
    scored = int(sum(scored_targets(d).sum() for d in docs))
    if scored == 0:
        raise ValueError("no token to score in the documents")
    # Mean attention context of a scored token (its position + 1), for the FLOP count.
    context = float(sum((torch.arange(1, d.tokens.numel())[scored_targets(d)]).sum() for d in docs)) / scored

    # 1. One forward per document: CE after each step; the reference's pick-one-step Q-exit.
    ce_step = torch.zeros(steps, dtype=torch.float64)
    reference = {q: [0.0, 0] for q in qs}  # q -> [CE sum, steps sum]
    for doc in docs:
        tokens = doc.tokens.to(device)
        out = model(tokens[None])
        keep = scored_targets(doc).to(device)
        labels = tokens[1:][keep]
        ce = torch.stack(
            [
                F.cross_entropy(model.logits(h[0, :-1][keep]).float(), labels, reduction="none")
                for h in out.hidden_states
            ]
        )  # (R, n)
        ce_step += ce.sum(1).double().cpu()
        gates = out.gate_logits[:, 0, :-1][:, keep]
        for q in qs:
            chosen = q_exit_steps(gates, q)
            reference[q][0] += float(ce.gather(0, chosen[None])[0].sum())
            reference[q][1] += int((chosen + 1).sum())
    per_step = [
        {
            "step": t + 1,
            "ce": float(ce_step[t] / scored),
            "ppl": math.exp(ce_step[t] / scored),
            "flops_per_token": decode_flops_per_token(cfg, t + 1, context),
        }
        for t in range(steps)
    ]
    reference_rows = [
        {"q": q, "ce": s / scored, "ppl": math.exp(s / scored), "mean_steps": n / scored}
        for q, (s, n) in reference.items()
    ]

    # 2. The real exit: token-by-token decoding with the true tokens fed back.
    runs = []
    for policy in kv_policies:
        for exit_policy in ["all"] + [f"q:{q:g}" for q in qs]:
            ce_sum, steps_sum, histogram, seconds = 0.0, 0, [0] * steps, 0.0
            for start in range(0, len(docs), batch_size):
                chunk = docs[start : start + batch_size]
                began = time.perf_counter()
                result = score(model, [d.tokens for d in chunk], exit_policy, policy)
                seconds += time.perf_counter() - began
                for doc, logprobs, exits in zip(chunk, result.logprobs, result.exit_steps, strict=True):
                    keep = scored_targets(doc)
                    ce_sum -= float(logprobs[keep].double().sum())
                    steps_sum += int((exits[keep] + 1).sum())
                    histogram = [
                        a + b for a, b in zip(histogram, torch.bincount(exits[keep], minlength=steps).tolist())
                    ]
            mean_steps = steps_sum / scored
            parsed = ExitPolicy.parse(exit_policy)
            runs.append(
                {
                    "kv_policy": policy,
                    "exit": exit_policy,
                    "q": parsed.value if parsed.kind == "q" else None,
                    "ce": ce_sum / scored,
                    "ppl": math.exp(ce_sum / scored),
                    "mean_steps": mean_steps,
                    "step_fraction": mean_steps / steps,
                    "flops_per_token": decode_flops_per_token(cfg, mean_steps, context),
                    "seconds_per_token": seconds / scored,
                    "exit_histogram": histogram,
                }
            )
    baseline = next(r for r in runs if r["kv_policy"] == kv_policies[0] and r["exit"] == "all")
    for run in runs:
        run["ppl_change"] = run["ppl"] / baseline["ppl"] - 1
        run["flops_saved"] = 1 - run["flops_per_token"] / baseline["flops_per_token"]
    return {
        "model": dataclasses.asdict(cfg),
        "parameters": model.num_parameters(),
        "documents": len(docs),
        "scored_tokens": scored,
        "mean_context": context,
        "per_step": per_step,
        "reference_q_exit": reference_rows,
        "runs": runs,
        "kv_cache_bytes_per_token": {
            p: kv_bytes_per_token(cfg, p, model.model.embed_tokens.weight.dtype) for p in KV_POLICIES
        },
    }


def kv_bytes_per_token(cfg: ModelConfig, policy: str, dtype: torch.dtype) -> int:
    cache = LoopKVCache(
        policy, cfg.recurrent_steps, cfg.num_layers, 1, 1, cfg.num_kv_heads, cfg.resolved_head_dim, dtype, "meta"
    )
    return cache.nbytes(used_only=False)
