"""The tiny LoopLM the unit and distributed tests build: 2 layers, 4 query heads over 2 key-value
heads, a 64-token vocabulary. Model tests use it as is; training tests widen it (`TRAINABLE`)."""

from __future__ import annotations

import math

import torch

from ouro_train.config import ModelConfig
from ouro_train.model import LoopLM

# Wide enough to overfit a batch and to split over 2 tensor-parallel ranks.
TRAINABLE = {"hidden_size": 64, "intermediate_size": 128}


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        name="t",
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=48,
        recurrent_steps=3,
        rope_theta=10000.0,
    )
    return ModelConfig(**(base | overrides))


def randomized(cfg: ModelConfig, seed: int = 0) -> LoopLM:
    """A model whose norms and gate bias are not trivially 1 / 0, so they are really exercised."""
    torch.manual_seed(seed)
    model = LoopLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) / math.sqrt(p.shape[-1]))
    return model


def model_and_prompt(seed: int = 0, steps: int = 3, length: int = 7, **overrides):
    """A random tiny model whose gate spreads exits over the steps (lambda around 0.25)."""
    model = randomized(tiny_config(recurrent_steps=steps, **overrides), seed).eval()
    with torch.no_grad():
        gate = model.model.early_exit_gate
        gate.weight.normal_(0, 1.5 / math.sqrt(gate.weight.shape[1]), generator=torch.Generator().manual_seed(seed))
        gate.bias.fill_(logit(0.25))
    torch.manual_seed(seed + 100)
    return model, torch.randint(5, 64, (1, length))


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# The exit gate's parameters: what stage II trains (everything else is frozen).
GATE = ("model.early_exit_gate.weight", "model.early_exit_gate.bias")


def handed_off_model(model_cfg: ModelConfig) -> LoopLM:
    """The seeded model with its LM moved off the initial weights, as after the SFT hand-off: a
    resume that rebuilt the LM from the seed instead of the checkpoint would show."""
    torch.manual_seed(0)
    model = LoopLM(model_cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name not in GATE:
                param.add_(0.05 * torch.randn(param.shape, generator=g))
    return model
