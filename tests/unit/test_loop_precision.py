"""train.precision=bf16_loop (parallel/precision.py, kernels/shared_linear.py): the shared linears'
bf16 copies are made once per optimizer step and their R weight gradients are accumulated in fp32
by the GEMMs. It computes autocast's step to bf16 rounding, resumes bitwise, reads checkpoints of
`bf16` runs, and (the CPU proxy of the GPU win, counted with torch.profiler) the weight casts and
weight-gradient adds per optimizer step do not grow with R, where plain autocast's do."""

from __future__ import annotations

import collections
import copy
import dataclasses

import pytest
import torch
from test_stability_guard import batches, config
from torch.profiler import ProfilerActivity, profile

from ouro_train.config.resolve import resolve
from ouro_train.config.schema import Config, ConfigError, ModelConfig, ParallelConfig, TrainConfig
from ouro_train.model import LoopLM
from ouro_train.model.objective import looplm_loss
from ouro_train.parallel.precision import apply_loop_precision, shared_linears
from ouro_train.train.trainer import Trainer


def model_config(steps: int) -> ModelConfig:
    return ModelConfig(
        name="t", vocab_size=64, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=80,
        recurrent_steps=steps,
    )  # fmt: skip


def per_step_counts(steps: int, loop: bool, compiled: bool) -> collections.Counter:
    """Ops on tensors of a shared weight's shape in the forward and backward passes of one
    optimizer step of 2 micro-batches (the second step: the first also builds what is cached),
    by kind: `cast` (a copy to another dtype: _to_copy, or the refresh's multi-tensor copy),
    `add` (add / add_: autograd summing the uses' gradients or accumulating micro-batches)."""
    model = LoopLM(model_config(steps), seed=0)
    if loop:
        apply_loop_precision(model)
    if compiled:
        for layer in model.model.layers:
            layer.compile(backend="aot_eager")  # the traced graph, as inductor receives it
    shapes = {tuple(m.weight.shape) for m in shared_linears(model)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 64, (3, 15), generator=torch.Generator().manual_seed(0))  # 42 tokens: no shape clash

    def micro_batches():
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(ids[:, :-1])
                loss = looplm_loss(out, model.lm_head, ids[:, 1:], beta=0.05).loss
            loss.backward()

    micro_batches()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # The forward and backward passes of an optimizer step (the optimizer's own adds are R-free).
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        micro_batches()
    counts = collections.Counter()
    for event in prof.events():
        first = tuple(event.input_shapes[0]) if event.input_shapes and event.input_shapes[0] else None
        if event.name == "aten::_foreach_copy_":
            counts["cast"] += 1
        elif first in shapes and event.name == "aten::_to_copy":
            counts["cast"] += 1
        elif first in shapes and event.name in ("aten::add", "aten::add_"):
            counts["add"] += 1
    return counts


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_casts_and_gradient_adds_per_optimizer_step_do_not_grow_with_R(compiled):
    linears = 14  # 2 layers x (q, k, v, o, gate, up, down)
    torch._dynamo.reset()  # the layers' graph does not depend on R: compiled once per mode
    plain = {r: per_step_counts(r, loop=False, compiled=compiled) for r in (1, 2, 4)}
    loop = {r: per_step_counts(r, loop=True, compiled=compiled) for r in (1, 2, 4)}
    # The counter sees the problem: autograd adds the R uses' gradients one by one (and, compiled,
    # every use casts the weight again in forward and backward, 2 x 2R casts per weight).
    assert plain[4]["add"] - plain[1]["add"] == 2 * 3 * linears
    if compiled:
        assert plain[4]["cast"] == 4 * plain[1]["cast"] == 4 * 2 * 2 * linears
    # bf16_loop: one multi-tensor copy per optimizer step, and one add per weight per optimizer
    # step (micro-batch 2 joining micro-batch 1's gradient), whatever R.
    for r in (1, 2, 4):
        assert loop[r]["cast"] == 1, (r, loop[r])
        assert loop[r]["add"] == linears, (r, loop[r])


def trainer(precision: str, model: LoopLM, lr: float = 1e-2, **train) -> Trainer:
    cfg = config()
    cfg.optim.lr = lr
    cfg.train.precision = precision
    for key, value in train.items():
        setattr(cfg.train, key, value)
    model = copy.deepcopy(model)
    if precision == "bf16_loop":
        apply_loop_precision(model)
    return Trainer(cfg, model, batches(), resolved=resolve(cfg))


def test_tracks_bf16_autocast_over_20_steps():
    # At lr 1e-3 (at 1e-2 this tiny run is chaotic: bf16 and fp32 part by 5% in loss within 20
    # steps) bf16 and fp32 stay within 2e-3 in loss and 1.5% in gradient norm of each other; so
    # must bf16_loop and bf16.
    torch.manual_seed(0)
    model = LoopLM(config().model)
    autocast, loop = trainer("bf16", model, lr=1e-3), trainer("bf16_loop", model, lr=1e-3)
    for step in range(20):
        a, b = autocast.train_step(), loop.train_step()
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-3), step
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=3e-2), step
    assert loop.model.loop_precision.refreshes == 20  # once per optimizer step (2 micro-batches each)
    for (name, p), q in zip(autocast.model.named_parameters(), loop.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-2, atol=2e-3, msg=name)
    assert not torch.equal(loop.model.lm_head.weight, model.lm_head.weight)


def resume(t: Trainer, state: dict, step: int) -> Trainer:
    """`t` continued from an engine state saved at `step`, at that step's data position."""
    t.engine.load_state_dict(state)
    t.state.step = step
    for _ in range(step * t.resolved.grad_accum_steps):
        next(t.train_batches)
    return t


def trained(precision: str, model: LoopLM, steps: int) -> tuple[Trainer, dict]:
    """A trainer of `model` after `steps` steps, and a copy of its engine state then."""
    t = trainer(precision, model)
    for _ in range(steps):
        t.train_step()
    return t, copy.deepcopy(t.engine.state_dict())


def test_resumes_bitwise():
    torch.manual_seed(0)
    model = LoopLM(config().model)
    straight, saved = trained("bf16_loop", model, 4)
    for _ in range(2):
        straight.train_step()
    resumed = resume(trainer("bf16_loop", model), saved, 4)
    for _ in range(2):
        resumed.train_step()
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_a_bf16_checkpoint_resumes_under_bf16_loop():
    torch.manual_seed(0)
    model = LoopLM(config().model)
    before, state = trained("bf16", model, 2)
    after = trainer("bf16_loop", model)
    assert after.engine.state_dict()["module"].keys() == state["module"].keys()  # no new state-dict keys
    resume(after, state, 2)
    for t in (before, after):
        t.train_step()
    # The compute copies were refreshed from the loaded weights (a stale copy would be the init's).
    for a, b in zip(before.model.parameters(), after.model.parameters()):
        torch.testing.assert_close(b, a, rtol=0.05, atol=1e-2)


def test_stage_two_freezes_the_layers_without_accumulating():
    torch.manual_seed(0)
    model = LoopLM(config().model)
    t = trainer("bf16_loop", model)
    t.cfg.objective.kind = "gate"
    for param in t.model.parameters():
        param.requires_grad_(False)
    t.model.model.early_exit_gate.requires_grad_(True)
    t.train_step()
    assert all(m.weight.grad is None and not m.weight_grad_acc.any() for m in shared_linears(t.model))


def test_the_config_refuses_zero_3_and_the_trainer_a_plain_model():
    with pytest.raises(ConfigError, match="train.precision.*zero_stage=3"):
        Config(train=TrainConfig(precision="bf16_loop"), parallel=ParallelConfig(zero_stage=3))
    Config(train=TrainConfig(precision="bf16_loop"), parallel=ParallelConfig(tensor_parallel=2, zero_stage=1))
    # Sequence parallelism with compiled layers too (tests/distributed/test_parallel.py runs it).
    Config(
        train=TrainConfig(precision="bf16_loop", seq_len=64),
        parallel=ParallelConfig(tensor_parallel=2, sequence_parallel=True, compile=True),
    )
    with pytest.raises(ConfigError, match="train.precision"):
        TrainConfig(precision="bf16-loop")
    cfg = config()
    cfg.train.precision = "bf16_loop"
    with pytest.raises(ValueError, match="apply_loop_precision"):
        Trainer(cfg, LoopLM(cfg.model), batches(), resolved=resolve(cfg))


def compiled_graphs(layers: int) -> int:
    """Graphs dynamo made for one forward and backward of a bf16_loop model with compiled layers."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = apply_loop_precision(LoopLM(dataclasses.replace(model_config(2), num_layers=layers), seed=0))
    for layer in model.model.layers:
        layer.compile(backend="aot_eager")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        looplm_loss(model(ids[:, :-1]), model.lm_head, ids[:, 1:], beta=0.05).loss.backward()
    return counters["stats"]["unique_graphs"]


def test_applying_it_twice_changes_nothing_and_keeps_the_state_dict():
    model = LoopLM(model_config(2), seed=0)
    keys = list(model.state_dict())
    once = apply_loop_precision(model).loop_precision
    assert apply_loop_precision(model).loop_precision is once
    assert list(model.state_dict()) == keys  # the compute copies and accumulators are not saved
    assert {type(m).__name__ for m in shared_linears(model)} == {"LoopLinear"}
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        looplm_loss(model(ids[:, :-1]), model.lm_head, ids[:, 1:], beta=0.05).loss.backward()
    assert once.refreshes == 1  # one pre-hook, not two


def test_one_compiled_graph_serves_every_layer():
    # Every layer runs the same code on its own weights: one graph (a forward per-module attribute
    # made dynamo recompile per layer and, past its recompile limit of 8, run Ouro-1.4B's other
    # layers eagerly: 490 ms a step on an H200 against 360 compiled).
    one = compiled_graphs(1)
    assert one >= 1
    assert compiled_graphs(3) == one


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["step", "layer", "selective"])
def test_compiled_checkpointed_layers_equal_eager_under_bf16_loop(policy):
    """Every checkpointing policy with compiled layers, two micro-batches (the accumulators are
    updated in place by each use's backward, R = 3 uses per layer): the gradients of eager. `layer`
    traced inside the compiled layer failed at the second use (apply_compile keeps it outside)."""
    from torch._dynamo.utils import counters

    from ouro_train.parallel.checkpointing import apply_activation_checkpointing, apply_compile

    torch._dynamo.reset()
    counters.clear()
    eager = apply_loop_precision(LoopLM(model_config(3), seed=0))
    compiled = apply_loop_precision(LoopLM(model_config(3), seed=0))
    compiled = apply_compile(apply_activation_checkpointing(compiled, policy))
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    for model in (eager, compiled):
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                looplm_loss(model(ids[:, :-1]), model.lm_head, ids[:, 1:], beta=0.05).loss.backward()
    # Really compiled, and one graph for both layers (a recompilation per layer would make two).
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        # bf16 rounding: inductor keeps some intermediates in fp32 where eager autocast rounds them.
        assert ((b.grad - a.grad).norm() / a.grad.norm()).item() < 4e-2, name


def test_compiled_layer_checkpointing_is_taken_under_bf16_loop():
    for precision in ("bf16_loop", "fp8"):
        for policy in ("layer", "selective", "step"):
            Config(
                train=TrainConfig(precision=precision),
                parallel=ParallelConfig(compile=True, activation_checkpointing=policy),
            )


def test_weights_loaded_after_a_forward_reach_the_compute_copies():
    """No optimizer step in between: the weights' version counters say the copies are stale."""
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(2))

    def grads(model):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            looplm_loss(model(ids[:, :-1]), model.lm_head, ids[:, 1:], beta=0.05).loss.backward()
        return {name: p.grad for name, p in model.named_parameters()}

    model = apply_loop_precision(LoopLM(model_config(2), seed=0))
    other = LoopLM(model_config(2), seed=1)
    grads(model)  # the copies now hold seed 0's weights
    model.load_state_dict(other.state_dict())
    want = grads(apply_loop_precision(other))
    for name, got in grads(model).items():
        assert torch.equal(got, want[name]), name
