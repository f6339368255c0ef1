"""`ouro-eval`: what the exit gate saves and what it costs, on held-out text.

For a model (checkpoint, imported weights or exported HF directory) and held-out documents (a
shard directory written by `ouro-data`, or a jsonl of {"text": ...} / {"messages": [...]}):

- cross-entropy / perplexity after each recurrent step (one teacher-forced forward: reading out
  after step t is exactly a model run for t steps);
- the reference's Q-exit (all R steps computed, one step's logits picked per token): the quality
  of the exit decisions alone, with no saving;
- the real Q-exit of `ouro_train.inference.generate`, for each q and KV policy: every document is
  decoded token by token with the true next token fed back (`score`), so later tokens see the
  cache the skipped steps left, exactly as in generation; mean steps used, FLOPs per token
  (`decode_flops_per_token`), wall-clock per token, an exit-step histogram.

Writes eval.json, eval.md and eval.png (quality vs compute; exit histogram) into --out.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ouro_train.checkpoint.hf import DTYPES, import_hf
from ouro_train.checkpoint.store import CheckpointError
from ouro_train.config.schema import ModelConfig
from ouro_train.inference.generate import ExitPolicy, q_exit_steps, score
from ouro_train.inference.kv_cache import KV_POLICIES, LoopKVCache
from ouro_train.model.flops import decode_flops_per_token
from ouro_train.model.looplm import LoopLM
from ouro_train.utils.atomic import atomic_write_text

DEFAULT_Q = (0.3, 0.5, 0.7, 0.9, 1.0)


# -- the model ------------------------------------------------------------------------------------
def load_model(path: Path, dtype: str = "float32", device: str = "cpu") -> LoopLM:
    """A LoopLM from a checkpoint directory, an `ouro-import` weights directory (its
    model.safetensors carries the config) or a Hugging Face Ouro directory (config.json)."""
    from ouro_train.checkpoint.weights import WEIGHTS, read_weights

    path = Path(path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if path.is_dir() and (path / "config.json").is_file() and not _has_saved_config(path / WEIGHTS):
        imported = import_hf(path)
        cfg, state = imported.cfg, imported.state
    else:
        state, raw = read_weights(path)
        if not raw:
            raise CheckpointError(
                f"{path}: the weights carry no model config; is it a checkpoint written by ouro-train?"
            )
        cfg = ModelConfig(**raw)
    if torch.device(device).type == "cpu" and cfg.kernels != "torch":
        cfg = dataclasses.replace(cfg, kernels="torch")  # Triton kernels need a GPU outside the interpreter
    with torch.device("meta"):
        model = LoopLM(cfg, seed=0)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not match its model config: {str(error).splitlines()[0]}") from error
    model.init_buffers(device)
    return model.to(device=device, dtype=DTYPES[dtype]).eval()


def _has_saved_config(file: Path) -> bool:
    """Ours (the model config in the safetensors metadata) rather than a Hugging Face export."""
    if not file.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return "model_config" in (f.metadata() or {})
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"{file}: unreadable ({error}); the file is truncated or corrupt") from error


# -- the documents --------------------------------------------------------------------------------
@dataclass
class Document:
    tokens: torch.Tensor  # (n,) int64
    loss_mask: torch.Tensor | None  # (n,) bool: which tokens are predicted and scored (None: all)


def shard_documents(directory: Path, count: int, max_tokens: int, vocab_size: int) -> list[Document]:
    """The first `count` windows of at most `max_tokens` tokens (at least 2, with a scored token) of
    a shard directory's documents in order, a long document giving several consecutive windows
    (each scored from its own start); shards are checked against their manifest's sha256 first."""
    from ouro_train.data.manifest import check_fits_model, load_manifest
    from ouro_train.data.source import ShardReader

    manifest = load_manifest(directory)
    check_fits_model(manifest, directory, vocab_size)
    docs: list[Document] = []
    for info in manifest.shards:
        reader = ShardReader(
            Path(directory) / info.name,
            info.documents,
            manifest.dtype,
            manifest.tokenizer.vocab_size,
            manifest.kind == "sft",
            expected_bytes=info.bytes,
            expected_sha256=info.sha256,
        )
        for index in range(info.documents):
            tokens, mask = reader.read(index)
            for start in range(0, len(tokens), max_tokens):  # a long document: consecutive windows
                window = torch.from_numpy(tokens[start : start + max_tokens].astype(np.int64))
                loss = None if mask is None else torch.from_numpy(mask[start : start + max_tokens].astype(bool))
                if window.numel() >= 2 and (loss is None or loss[1:].any()):
                    docs.append(Document(window, loss))
                if len(docs) == count:
                    return docs
    if not docs:
        raise ValueError(f"{directory}: no document of 2 tokens or more")
    return docs


def jsonl_documents(path: Path, tokenizer, count: int, max_tokens: int, bos_id: int | None = None) -> list[Document]:
    """{"text": ...} lines (every token scored; `bos_id` first, where the model's pretraining data
    prepended one) or {"messages": [...]} (ChatML; the assistant turns scored, as in SFT). Text is
    encoded without the tokenizer's own specials, as the training data was (an exported
    tokenizer.json's post-processor adds a BOS)."""
    from ouro_train.data.sft import render_conversation, special_ids
    from ouro_train.data.tokenize import iter_jsonl

    docs: list[Document] = []
    chat = None
    for where, record in iter_jsonl(Path(path)):
        if "messages" in record:
            chat = chat or special_ids(tokenizer, False, str(path))
            tokens, mask = render_conversation(tokenizer, record["messages"], chat, where=where)
            doc = Document(
                torch.from_numpy(tokens[:max_tokens].astype(np.int64)), torch.from_numpy(mask[:max_tokens] > 0)
            )
        elif isinstance(record.get("text"), str):
            ids = ([bos_id] if bos_id is not None else []) + tokenizer.encode(
                record["text"], add_special_tokens=False
            ).ids
            doc = Document(torch.tensor(ids[:max_tokens], dtype=torch.long), None)
        else:
            raise ValueError(f"{where}: expected a 'text' string or a 'messages' list")
        if doc.tokens.numel() >= 2:
            docs.append(doc)
        if len(docs) == count:
            break
    if not docs:
        raise ValueError(f"{path}: no prompt of 2 tokens or more")
    return docs


def _targets(doc: Document) -> torch.Tensor:
    """(n-1,) bool: which next-token predictions are scored."""
    return torch.ones(doc.tokens.numel() - 1, dtype=torch.bool) if doc.loss_mask is None else doc.loss_mask[1:]


# -- the evaluation -------------------------------------------------------------------------------
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
    scored = int(sum(_targets(d).sum() for d in docs))
    if scored == 0:
        raise ValueError("no token to score in the documents")
    # Mean attention context of a scored token (its position + 1), for the FLOP count.
    context = float(sum((torch.arange(1, d.tokens.numel())[_targets(d)]).sum() for d in docs)) / scored

    # 1. One forward per document: CE after each step; the reference's pick-one-step Q-exit.
    ce_step = torch.zeros(steps, dtype=torch.float64)
    reference = {q: [0.0, 0] for q in qs}  # q -> [CE sum, steps sum]
    for doc in docs:
        tokens = doc.tokens.to(device)
        out = model(tokens[None])
        keep = _targets(doc).to(device)
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
                    keep = _targets(doc)
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


# -- the report -----------------------------------------------------------------------------------
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


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = len(result["per_step"])
    fig, (ax, ax_h) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax.plot(
        [r["step"] for r in result["per_step"]],
        [r["ppl"] for r in result["per_step"]],
        "o-",
        color="black",
        label="fixed exit at step t",
    )
    ax.plot(
        [r["mean_steps"] for r in result["reference_q_exit"]],
        [r["ppl"] for r in result["reference_q_exit"]],
        "x:",
        color="grey",
        label="Q-exit picked after all steps (reference)",
    )
    policies = list(dict.fromkeys(r["kv_policy"] for r in result["runs"]))
    for i, policy in enumerate(policies):
        rows = [r for r in result["runs"] if r["kv_policy"] == policy and r["q"] is not None]
        ax.plot(
            [r["mean_steps"] for r in rows], [r["ppl"] for r in rows], "s-", color=f"C{i}", label=f"Q-exit, KV {policy}"
        )
        for r in rows:
            ax.annotate(
                f"q={r['q']:g}", (r["mean_steps"], r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    ax.set(
        xlabel="recurrent steps computed per token (mean)", ylabel="perplexity (held out)", title="quality vs compute"
    )
    ax.legend(fontsize=7)
    rows = [r for r in result["runs"] if r["kv_policy"] == policies[0] and r["q"] is not None]
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        total = max(1, sum(r["exit_histogram"]))
        ax_h.bar(
            [t + 1 + (i - len(rows) / 2 + 0.5) * width for t in range(steps)],
            [c / total for c in r["exit_histogram"]],
            width,
            label=f"q={r['q']:g}",
        )
    ax_h.set(xlabel="exit step", ylabel="fraction of tokens", title=f"exit steps (KV {policies[0]})")
    ax_h.set_xticks(range(1, steps + 1))
    ax_h.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(result: dict, out: Path, title: str = "Exit evaluation") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / "eval.png")
    atomic_write_text(out / "eval.md", markdown(result, title))
    # Last, atomically: its presence means the evaluation is complete (the pipeline's done-marker).
    atomic_write_text(out / "eval.json", json.dumps(result, indent=1) + "\n")
    return out / "eval.json"
