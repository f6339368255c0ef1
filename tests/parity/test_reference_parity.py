"""Our LoopLM against golden outputs of the reference implementation (HF `modeling_ouro.py`).

The golden file holds a tiny random Ouro's weights (reference key names), input ids, and the
reference's per-step hidden states, logits and gate logits in fp32; `make_golden.py` made it
(see README.md here). Loading the weights with strict=True also proves the key names match.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ouro_train.config import ModelConfig
from ouro_train.model import LoopLM

GOLDEN = Path(__file__).with_name("golden_tiny.safetensors")


@pytest.fixture(scope="module")
def golden():
    with safe_open(GOLDEN, framework="pt") as f:
        hf = json.loads(f.metadata()["config"])
    tensors = load_file(GOLDEN)
    cfg = ModelConfig(
        name="golden",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"],
        head_dim=hf["head_dim"],
        intermediate_size=hf["intermediate_size"],
        recurrent_steps=hf["total_ut_steps"],
        rope_theta=hf["rope_theta"],
        norm_eps=hf["rms_norm_eps"],
        max_position_embeddings=hf["max_position_embeddings"],
    )
    model = LoopLM(cfg)
    weights = {k: v for k, v in tensors.items() if not k.startswith("golden.")}
    model.load_state_dict(weights, strict=True)
    return model, tensors


def test_per_step_hidden_logits_and_gates_match_reference(golden):
    model, tensors = golden
    with torch.no_grad():
        out = model(tensors["golden.input_ids"])
    steps = tensors["golden.step_logits"].shape[0]
    assert len(out.hidden_states) == steps == 4
    for t in range(steps):
        torch.testing.assert_close(out.hidden_states[t], tensors["golden.step_hidden"][t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            model.logits(out.hidden_states[t]), tensors["golden.step_logits"][t], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(out.gate_logits[t], tensors["golden.gate_logits"][t], atol=1e-5, rtol=1e-5)


def test_golden_weights_are_not_trivial(golden):
    # Norm weights and the gate bias were re-randomised, so the comparison exercises them.
    _, tensors = golden
    assert not torch.allclose(tensors["model.layers.0.input_layernorm_2.weight"], torch.ones(1))
    assert tensors["model.early_exit_gate.bias"].abs().item() > 0
