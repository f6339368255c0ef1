"""parallel.activation_checkpointing=selective: each decoder layer use keeps its matmul and attention
outputs and recomputes the rest (torch's selective activation checkpointing). Gradients equal the
uncheckpointed model's exactly, under fp32, bf16 autocast (whose weight-cast cache the trainer turns
off for it) and bf16_loop, and the step's peak memory (torch.profiler's CPU allocation timeline)
lies between `none` and `layer`."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import randomized, tiny_config
from torch.profiler import ProfilerActivity, profile

from ouro_train.config.schema import Config, ParallelConfig, TrainConfig
from ouro_train.model.memory import estimate_memory
from ouro_train.model.objective import looplm_loss
from ouro_train.parallel.checkpointing import apply_activation_checkpointing
from ouro_train.parallel.precision import apply_loop_precision


def step(model, ids, precision: str) -> None:
    autocast = precision != "fp32"
    # As the trainer does for `selective`: no autocast cast cache (the replay must cast as the forward did).
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
        loss = looplm_loss(model(ids[:, :-1]), model.lm_head, ids[:, 1:], beta=0.05).loss
    loss.backward()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16_loop"])
def test_selective_gradients_equal_no_checkpointing(precision):
    base = randomized(tiny_config(hidden_size=64, intermediate_size=128))
    ids = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(0))
    grads = {}
    for policy in ("none", "selective"):
        model = copy.deepcopy(base)
        if precision == "bf16_loop":
            apply_loop_precision(model)
        step(apply_activation_checkpointing(model, policy), ids, precision)
        grads[policy] = {name: p.grad for name, p in model.named_parameters()}
    for name, want in grads["none"].items():
        assert torch.equal(grads["selective"][name], want), name


def peak_bytes(model, ids) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(model, ids, "bf16")
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def test_selective_peak_memory_lies_between_none_and_layer():
    base = randomized(tiny_config(hidden_size=128, intermediate_size=256))
    ids = torch.randint(0, 64, (4, 257), generator=torch.Generator().manual_seed(0))
    peak = {policy: peak_bytes(apply_activation_checkpointing(copy.deepcopy(base), policy), ids) for policy in
            ("none", "selective", "layer")}  # fmt: skip
    assert peak["layer"] < peak["selective"] < 0.8 * peak["none"], peak


def test_the_memory_estimate_orders_the_policies():
    def activations(policy: str) -> float:
        cfg = Config(
            model=tiny_config(hidden_size=256, intermediate_size=704, num_layers=4),
            train=TrainConfig(seq_len=4096, micro_batch_size=1),
            parallel=ParallelConfig(activation_checkpointing=policy),
        )
        return estimate_memory(cfg, 1).activations_gib

    assert activations("layer") < activations("selective") < activations("none")
