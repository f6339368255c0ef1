import math

import pytest
import torch
from tiny_models import randomized
from tiny_models import tiny_config as tiny

from ouro_train.config import ConfigError, ModelConfig
from ouro_train.config.store import compose_config
from ouro_train.model import LoopLM
from ouro_train.model.flops import count_model


@pytest.mark.parametrize("model_name, expected", [("ouro_1p4b", 1_434_652_673), ("ouro_2p6b", 2_667_974_657)])
def test_released_sizes_have_exact_parameter_counts(model_name, expected):
    cfg = compose_config([f"model={model_name}"]).model
    with torch.device("meta"):
        model = LoopLM(cfg)
    assert model.num_parameters() == expected
    assert count_model(cfg, seq_len=4096).total_params == expected


def test_state_dict_uses_reference_names():
    keys = set(LoopLM(tiny(num_layers=1)).state_dict())
    layer = "model.layers.0."
    expected = {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.early_exit_gate.weight",
        "model.early_exit_gate.bias",
        "lm_head.weight",
    }
    expected |= {f"{layer}self_attn.{p}_proj.weight" for p in "qkvo"}
    expected |= {f"{layer}mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    expected |= {
        f"{layer}{n}.weight"
        for n in (
            "input_layernorm",
            "input_layernorm_2",
            "post_attention_layernorm",
            "post_attention_layernorm_2",
        )
    }
    assert keys == expected


# An independent plain sandwich-norm transformer written from the spec, sharing only weights.
def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, theta):  # x: (B, N, S, D), rotate-half convention via explicit angle pairs
    d = x.shape[-1]
    pos = torch.arange(x.shape[2], dtype=torch.float64)
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.outer(pos, freq).to(x.dtype)  # (S, D/2)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], dim=-1)


def plain_transformer_step(sd, cfg: ModelConfig, h):
    b, s, _ = h.shape
    n, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    causal = torch.full((s, s), float("-inf")).triu(1)
    for i in range(cfg.num_layers):
        p = lambda name, i=i: sd[f"model.layers.{i}.{name}.weight"]  # noqa: E731
        x = _rms(h, p("input_layernorm"), cfg.norm_eps)
        q = (x @ p("self_attn.q_proj").T).view(b, s, n, d).transpose(1, 2)
        kk = (x @ p("self_attn.k_proj").T).view(b, s, k, d).transpose(1, 2).repeat_interleave(n // k, dim=1)
        v = (x @ p("self_attn.v_proj").T).view(b, s, k, d).transpose(1, 2).repeat_interleave(n // k, dim=1)
        q, kk = _rope(q, cfg.rope_theta), _rope(kk, cfg.rope_theta)
        att = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(d) + causal, dim=-1) @ v
        att = att.transpose(1, 2).reshape(b, s, n * d) @ p("self_attn.o_proj").T
        h = h + _rms(att, p("input_layernorm_2"), cfg.norm_eps)
        x = _rms(h, p("post_attention_layernorm"), cfg.norm_eps)
        mlp = (torch.nn.functional.silu(x @ p("mlp.gate_proj").T) * (x @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
        h = h + _rms(mlp, p("post_attention_layernorm_2"), cfg.norm_eps)
    return _rms(h, sd["model.norm.weight"], cfg.norm_eps)


@pytest.mark.parametrize("steps", [1, 3])
def test_loop_equals_plain_transformer_applied_r_times(steps):
    cfg = tiny(recurrent_steps=steps)
    model = randomized(cfg)
    sd = model.state_dict()
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    out = model(ids)
    h = sd["model.embed_tokens.weight"][ids]
    for t in range(steps):
        h = plain_transformer_step(sd, cfg, h)
        torch.testing.assert_close(out.hidden_states[t], h, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(model.logits(out.hidden_states[t]), h @ sd["lm_head.weight"].T, atol=1e-4, rtol=1e-5)
        gate = h @ sd["model.early_exit_gate.weight"].T + sd["model.early_exit_gate.bias"]
        torch.testing.assert_close(out.gate_logits[t], gate.squeeze(-1), atol=2e-5, rtol=1e-5)


def test_changing_a_future_token_never_changes_past_outputs_at_any_step():
    model = randomized(tiny(recurrent_steps=4))
    ids = torch.randint(0, 64, (1, 12))
    changed = ids.clone()
    changed[0, 7] = (ids[0, 7] + 1) % 64
    a, b = model(ids), model(changed)
    for t in range(4):
        torch.testing.assert_close(a.hidden_states[t][:, :7], b.hidden_states[t][:, :7], rtol=0, atol=0)
        torch.testing.assert_close(a.gate_logits[t][:, :7], b.gate_logits[t][:, :7], rtol=0, atol=0)
        # and the change is visible from position 7 on, so the check is not vacuous
        assert not torch.allclose(a.hidden_states[t][:, 7:], b.hidden_states[t][:, 7:])


def test_document_ids_isolate_packed_documents():
    model = randomized(tiny())
    doc_a, doc_b = torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 7))
    packed = torch.cat([doc_a, doc_b], dim=1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    positions = torch.tensor([list(range(5)) + list(range(7))])
    out = model(packed, position_ids=positions, doc_ids=doc_ids)
    alone = model(doc_b)
    for t in range(3):
        torch.testing.assert_close(out.hidden_states[t][:, 5:], alone.hidden_states[t], atol=1e-5, rtol=1e-5)


def test_grouped_query_attention_equals_mha_with_repeated_kv_heads():
    gqa_cfg = tiny(num_kv_heads=2)
    gqa = randomized(gqa_cfg)
    mha = LoopLM(tiny(num_kv_heads=4))
    sd = gqa.state_dict()
    d = gqa_cfg.resolved_head_dim
    for i in range(gqa_cfg.num_layers):
        for proj in ("k_proj", "v_proj"):
            key = f"model.layers.{i}.self_attn.{proj}.weight"
            sd[key] = sd[key].view(2, d, -1).repeat_interleave(2, dim=0).reshape(4 * d, -1)
    mha.load_state_dict(sd)
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(gqa(ids).hidden_states[-1], mha(ids).hidden_states[-1], atol=1e-5, rtol=1e-5)


def test_recurrent_steps_override_and_bf16_autocast():
    model = randomized(tiny(recurrent_steps=4))
    ids = torch.randint(0, 64, (2, 8))
    out = model(ids, recurrent_steps=2)
    assert len(out.hidden_states) == 2 and out.gate_logits.shape == (2, 2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(ids)
    # Parameters are fp32, so the residual stream stays fp32 and only the matmuls run in bf16.
    assert low.gate_logits.dtype == torch.float32
    high = model(ids)
    assert not torch.equal(low.hidden_states[-1].float(), high.hidden_states[-1])  # bf16 really ran
    # bf16 has ~3 significant digits; the states are O(1) after the final norm.
    torch.testing.assert_close(low.hidden_states[-1].float(), high.hidden_states[-1], atol=0.15, rtol=0.05)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(recurrent_steps=0), "model.recurrent_steps"),
        (dict(num_heads=5), "model.num_heads"),
        (dict(num_kv_heads=3), "model.num_kv_heads"),
        (dict(attention="flash3"), "model.attention"),
    ],
)
def test_invalid_model_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny(**overrides)
