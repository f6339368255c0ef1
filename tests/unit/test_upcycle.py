import pytest
import torch
from tiny_models import randomized, tiny_config
from torch import nn

from ouro_train.checkpoint.upcycle import layer_order, upcycle_config, upcycle_state_dict
from ouro_train.model import LoopLM


def source_model(steps: int = 4) -> LoopLM:
    return randomized(tiny_config(name="s", num_layers=3, recurrent_steps=steps))


def grown(model: LoopLM, order: str, steps: int | None = None) -> LoopLM:
    cfg = upcycle_config(model.config, order, steps)
    bigger = LoopLM(cfg)
    bigger.load_state_dict(upcycle_state_dict(model.state_dict(), model.config.num_layers, order), strict=True)
    return bigger


def test_orders():
    assert layer_order(3, "stack") == [0, 1, 2, 0, 1, 2]
    assert layer_order(3, "interleave") == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="stack or interleave"):
        layer_order(3, "zigzag")


def test_stacked_upcycle_with_half_the_steps_equals_the_original_when_the_final_norm_is_identity():
    original = source_model(steps=4)
    stacked = grown(original, "stack")
    assert stacked.config.num_layers == 6 and stacked.config.recurrent_steps == 2
    original.model.norm, stacked.model.norm = nn.Identity(), nn.Identity()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        before, after = original(ids), stacked(ids)
    # Step t of the stacked model ran the same 6t layer uses as step 2t of the original.
    for t in range(2):
        torch.testing.assert_close(after.hidden_states[t], before.hidden_states[2 * t + 1], atol=1e-5, rtol=1e-5)


def test_interleave_copies_each_layer_twice_and_shares_the_rest():
    original = source_model()
    bigger = grown(original, "interleave", steps=4)
    sd, big = original.state_dict(), bigger.state_dict()
    for new, source in enumerate([0, 0, 1, 1, 2, 2]):
        assert torch.equal(
            big[f"model.layers.{new}.mlp.up_proj.weight"], sd[f"model.layers.{source}.mlp.up_proj.weight"]
        )
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.early_exit_gate.bias"):
        assert torch.equal(big[key], sd[key])
