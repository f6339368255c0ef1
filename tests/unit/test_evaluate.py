"""ouro-eval's numbers: per-step CE equals the forward's, the real exit at all steps equals the
last step's CE, q = 1 equals all steps, FLOPs follow the steps used; the outputs are written; an
eval stage in a pipeline validates and takes its own overrides."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import model_and_prompt

from ouro_train.checkpoint.hf import export_hf
from ouro_train.checkpoint.weights import save_weights
from ouro_train.config.schema import ConfigError
from ouro_train.inference.documents import Document
from ouro_train.inference.eval_report import markdown, write_outputs
from ouro_train.inference.evaluate import evaluate
from ouro_train.inference.loading import load_model
from ouro_train.model.flops import count_model, decode_flops_per_token


def documents(count: int = 3, seed: int = 0) -> list[Document]:
    torch.manual_seed(seed)
    docs = [Document(torch.randint(5, 64, (n,)), None) for n in (14, 9, 20)[:count]]
    mask = torch.ones(20, dtype=torch.bool)
    mask[:8] = False  # an SFT-like document: only its second part is scored
    docs.append(Document(torch.randint(5, 64, (20,)), mask))
    return docs


def test_evaluation_numbers_are_consistent(tmp_path):
    model, _ = model_and_prompt(seed=1, steps=3)
    docs = documents()
    result = evaluate(model, docs, qs=(0.5, 1.0), kv_policies=("full", "last"))
    scored = sum(d.tokens.numel() - 1 for d in docs[:3]) + int(docs[3].loss_mask[1:].sum())
    assert result["scored_tokens"] == scored

    # Per-step CE by hand, from the forward.
    model.requires_grad_(False)  # a local model: no graph for the hand computation
    for step in range(3):
        total = 0.0
        for doc in docs:
            out = model(doc.tokens[None])
            logp = model.logits(out.hidden_states[step][0, :-1]).log_softmax(-1)
            nll = -logp.gather(1, doc.tokens[1:, None])[:, 0]
            keep = torch.ones_like(nll, dtype=torch.bool) if doc.loss_mask is None else doc.loss_mask[1:]
            total += float(nll[keep].sum())
        assert result["per_step"][step]["ce"] == pytest.approx(total / scored, rel=1e-5)

    runs = {(r["kv_policy"], r["exit"]): r for r in result["runs"]}
    # Decoding every step with the full cache is the forward, token by token.
    assert runs["full", "all"]["ce"] == pytest.approx(result["per_step"][-1]["ce"], rel=1e-5)
    assert runs["full", "q:1"]["ce"] == pytest.approx(runs["full", "all"]["ce"], rel=1e-6)
    assert runs["full", "all"]["mean_steps"] == 3 and runs["full", "all"]["ppl_change"] == 0
    half = runs["full", "q:0.5"]
    assert 1 <= half["mean_steps"] < 3 and sum(half["exit_histogram"]) == scored
    assert half["flops_saved"] > 0
    assert half["flops_per_token"] == pytest.approx(
        decode_flops_per_token(model.config, half["mean_steps"], result["mean_context"])
    )
    # The reference's Q-exit picks the same steps when nothing before was skipped: same mean steps
    # for q = 1, and within the same range for q = 0.5.
    reference = {r["q"]: r for r in result["reference_q_exit"]}
    assert reference[1.0]["mean_steps"] == 3
    assert reference[1.0]["ce"] == pytest.approx(result["per_step"][-1]["ce"], rel=1e-5)
    # The `last` cache differs from `full` once earlier tokens were computed at all steps.
    assert runs["last", "all"]["ce"] != pytest.approx(runs["full", "all"]["ce"], rel=1e-7)
    assert result["kv_cache_bytes_per_token"]["full"] == 3 * result["kv_cache_bytes_per_token"]["last"]

    write_outputs(result, tmp_path / "eval")
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["runs"][0]["exit"] == "all"
    assert (tmp_path / "eval" / "eval.png").stat().st_size > 10_000
    text = (tmp_path / "eval" / "eval.md").read_text()
    assert "| full | q:0.5 |" in text and "![quality vs compute" in text
    assert math.isfinite(saved["per_step"][0]["ppl"])


def test_markdown_names_the_cheapest_setting_within_one_percent():
    model, _ = model_and_prompt(seed=2, steps=3)
    result = evaluate(model, documents(1), qs=(0.5,), kv_policies=("full",))
    for run in result["runs"]:
        run["ppl_change"] = 0.0 if run["exit"] == "all" else 0.005
    assert "Cheapest within 1% perplexity: q:0.5" in markdown(result)
    for run in result["runs"]:
        run["ppl_change"] = 0.0 if run["exit"] == "all" else 0.02
    assert "No Q-exit setting stays within 1%" in markdown(result)


def test_decode_flops_count_one_head_and_the_steps_used():
    cfg = model_and_prompt(steps=4)[0].config
    four = decode_flops_per_token(cfg, 4, context=0)
    one = decode_flops_per_token(cfg, 1, context=0)
    head = 2 * cfg.vocab_size * cfg.hidden_size
    assert four - head == pytest.approx(4 * (one - head))
    # All steps at context S: the training forward's count, less the R - 1 extra LM heads it reads.
    forward = count_model(cfg, 16).forward_flops_per_token
    attention_forward = count_model(cfg, 16).forward_flops_per_token - count_model(cfg, 0).forward_flops_per_token
    assert decode_flops_per_token(cfg, 4, context=16) == pytest.approx(forward - 3 * head, rel=1e-9)
    assert attention_forward > 0


def test_load_model_from_a_checkpoint_and_an_hf_export(tmp_path):
    model, prompt = model_and_prompt(seed=3)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_weights(state, tmp_path / "model.safetensors", model.config)
    export_hf(state, model.config, tmp_path / "hf", dtype="float32")
    expected = model.logits(model(prompt).hidden_states[-1])
    for path in (tmp_path, tmp_path / "hf"):
        loaded = load_model(path)
        torch.testing.assert_close(loaded.logits(loaded(prompt).hidden_states[-1]), expected, rtol=0, atol=0)
    half = load_model(tmp_path, dtype="bfloat16")
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16


def test_eval_stage_in_a_pipeline_validates_and_takes_overrides(tmp_path):
    from ouro_train.pipeline.plan import _eval_spec
    from ouro_train.pipeline.spec import PipelineSpec, StageSpec

    good = StageSpec(name="eval", kind="eval", data="d")
    PipelineSpec(stages=[StageSpec(name="a"), good]).validate("p")
    for bad, message in (
        (StageSpec(name="eval", kind="eval"), "needs `data`"),
        (StageSpec(name="eval", kind="eval", data="d", q=[1.5]), "every q in"),
        (StageSpec(name="eval", kind="eval", data="d", kv_policies=["lru"]), "kv_policies"),
    ):
        with pytest.raises(ConfigError, match=message):
            PipelineSpec(stages=[StageSpec(name="a"), bad]).validate("p")
    with pytest.raises(ConfigError, match="needs a stage before it"):
        PipelineSpec(stages=[good]).validate("p")
    changed = _eval_spec(good, ["documents=2", "q=[0.5]", "kv_policies=[last]"])
    assert (changed.documents, changed.q, changed.kv_policies) == (2, [0.5], ["last"])
    with pytest.raises(ConfigError, match="stage eval"):
        _eval_spec(good, ["documnts=2"])
