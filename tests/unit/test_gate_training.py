"""Stage II (adaptive gate training, `objective.kind=gate`) as a stage: only the exit gate learns.

The LM must come out of the stage bit for bit as it went in (torch.equal, not a tolerance: a
frozen parameter has no gradient and no optimizer state, so nothing may touch it), the optimizer
must hold state for the gate's H + 1 parameters alone, a checkpoint of the stage must resume
exactly, and the recipe must compose and sit last in every shipped pipeline. ZeRO 1/2/3 and the
elastic (universal) resume are in tests/distributed/test_gate_training_zero.py.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import GATE, TRAINABLE, handed_off_model, tiny_config

from ouro_train.checkpoint.manager import Checkpointer
from ouro_train.config import Config, ObjectiveConfig, OptimConfig, TrainConfig
from ouro_train.config.resolve import resolve
from ouro_train.config.store import compose_config
from ouro_train.model import LoopLM
from ouro_train.model.objective import gate_loss
from ouro_train.train.trainer import Trainer

VOCAB, SEQ, ROWS = 64, 16, 4


def gate_config(steps: int = 6, lr: float = 3e-2) -> Config:
    return Config(
        model=tiny_config(**TRAINABLE, vocab_size=VOCAB),
        objective=ObjectiveConfig(kind="gate"),
        optim=OptimConfig(lr=lr),
        train=TrainConfig(steps=steps, micro_batch_size=ROWS, seq_len=SEQ),
    )


def batch(step: int) -> dict:
    g = torch.Generator().manual_seed(300 + step % 2)  # two batches, alternating: the "training data"
    tokens = torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=g)
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def trainer_for(cfg: Config, model: LoopLM, start: int = 0) -> Trainer:
    return Trainer(cfg, model, (batch(s) for s in range(start, 10_000)), resolved=resolve(cfg))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def mean_gate_loss(model: LoopLM, cfg: Config) -> float:
    with torch.no_grad():
        losses = []
        for step in range(2):
            b = batch(step)
            out = gate_loss(model(b["input_ids"]), model.lm_head, b["labels"], cfg.objective.gate_k)
            losses.append(float(out.loss_sum) / out.num_tokens)
    return sum(losses) / len(losses)


@pytest.mark.slow  # ~10 s on 2 busy cores
def test_gate_training_leaves_the_lm_bit_identical_and_lowers_the_gate_loss():
    cfg = gate_config(steps=8)
    model = handed_off_model(cfg.model)
    before, loss_before = snapshot(model), mean_gate_loss(model, cfg)
    trainer = trainer_for(cfg, model)
    for _ in range(8):
        trainer.train_step()
    after = snapshot(model)
    frozen = [name for name in before if name not in GATE]
    assert len(frozen) == len(before) - 2
    for name in frozen:
        assert torch.equal(before[name], after[name]), f"{name} changed in gate training"
    for name in GATE:
        assert not torch.equal(before[name], after[name]), f"{name} did not train"
    loss_after = mean_gate_loss(model, cfg)
    assert loss_after < 0.95 * loss_before  # measured 0.448 -> 0.395, (loss_before, loss_after)


@pytest.mark.slow  # 4-5 s on 2 busy cores
def test_only_the_gate_gets_gradients_and_optimizer_state():
    cfg = gate_config()
    model = handed_off_model(cfg.model)
    trainer = trainer_for(cfg, model)
    out = trainer._loss(batch(0))
    out.loss_sum.backward()
    with_grad = sorted(name for name, param in model.named_parameters() if param.grad is not None)
    assert with_grad == sorted(GATE)
    model.zero_grad(set_to_none=True)
    for _ in range(2):
        trainer.train_step()
    optimizer = trainer.engine.optimizer
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    gate_params = {id(model.get_parameter(name)) for name in GATE}
    assert held == gate_params
    assert {id(p) for p in optimizer.state} == gate_params
    moments = [t for state in optimizer.state.values() for k, t in state.items() if k in ("exp_avg", "exp_avg_sq")]
    hidden = cfg.model.hidden_size
    assert sum(t.numel() for t in moments) == 2 * (hidden + 1)
    assert sum(t.numel() * t.element_size() for t in moments) == 8 * (hidden + 1)
    assert all(param.grad is None for param in model.parameters())


@pytest.mark.slow
def test_a_gate_training_checkpoint_resumes_bit_for_bit(tmp_path):
    """4 steps straight vs 2 steps, a checkpoint, a fresh trainer built like a resumed stage (the
    seeded initial weights, not the handed-off LM), 2 more: the same losses, the same tensors."""
    cfg = gate_config(steps=4)
    handed = snapshot(handed_off_model(cfg.model))
    straight = trainer_for(cfg, handed_off_model(cfg.model))
    expected = [straight.train_step()["loss"] for _ in range(4)]

    first = trainer_for(cfg, handed_off_model(cfg.model))
    got = [first.train_step()["loss"] for _ in range(2)]
    saved = Checkpointer(cfg, tmp_path, resolved=resolve(cfg)).save(first, None)
    weights = load_file(saved / "model.safetensors")
    for name, value in handed.items():
        if name not in GATE:
            assert torch.equal(weights[name], value), f"{name}: the checkpoint does not hold the frozen LM"
    torch.manual_seed(0)
    second = trainer_for(cfg, LoopLM(cfg.model), start=2)
    Checkpointer(cfg, tmp_path, resolved=resolve(cfg)).load(saved, second, None)
    got += [second.train_step()["loss"] for _ in range(2)]
    assert got == expected
    final, resumed = snapshot(straight.model), snapshot(second.model)
    for name in final:
        assert torch.equal(final[name], resumed[name]), name
    for name in GATE:
        assert not torch.equal(resumed[name], handed[name])


def test_the_recipe_composes_as_stage_ii():
    cfg = compose_config(["stage=gate_training", "model=ouro_1p4b", "checkpoint.init_from=/ckpt/sft"])
    assert cfg.stage_name == "gate_training"
    assert cfg.objective.kind == "gate"
    assert (cfg.objective.gate_k, cfg.objective.gate_gamma) == (50.0, 0.005)  # OURO_SPEC
    assert cfg.model.recurrent_steps == 4 and cfg.model.rope_theta == 1e6
    assert cfg.checkpoint.init_optimizer is False and cfg.checkpoint.init_schedule == "reset"
    assert cfg.checkpoint.init_data_position is False
    sft = compose_config(["stage=sft", "model=ouro_1p4b"])
    assert cfg.optim.lr > sft.optim.lr  # the gate is H + 1 parameters


@pytest.mark.slow  # composes 26 stage configs
def test_gate_training_is_the_last_stage_of_every_shipped_pipeline_after_sft(tmp_path):
    from ouro_train.pipeline.plan import plan
    from ouro_train.pipeline.spec import load_pipeline

    for name in ("demo", "ouro_1p4b", "ouro_2p6b"):
        planned = {p.spec.name: p for p in plan(load_pipeline(name), tmp_path / name, [])}
        names = list(planned)
        assert names.index("gate_training") == names.index("sft") + 1, name
        gate, sft = planned["gate_training"], planned["sft"]
        assert gate.cfg.objective.kind == "gate" and sft.cfg.objective.kind == "stage1"
        assert gate.input == sft.output  # weights from SFT's final checkpoint
        assert gate.cfg.data.sources == sft.cfg.data.sources  # the data the model is used on
        assert gate.cfg.model == sft.cfg.model
        if name == "demo":
            assert gate.cfg.train.total_steps <= 40  # the demo stays short


def test_the_memory_plan_counts_only_the_gate_states():
    from ouro_train.model.memory import estimate_memory

    cfg = compose_config(["stage=gate_training", "model=ouro_1p4b", "parallel=zero1"])
    sft = compose_config(["stage=sft", "model=ouro_1p4b", "parallel=zero1"])
    gate, full = estimate_memory(cfg, 256), estimate_memory(sft, 256)
    assert gate.states_gib == pytest.approx(4 * 1_434_652_673 / 2**30, rel=1e-3)  # the fp32 weights alone
    assert gate.activations_gib < full.activations_gib


def test_universal_checkpoint_patterns_cover_only_trained_parameters():
    from ouro_train.checkpoint.universal import universal_checkpoint_info

    names = [name for name, _ in LoopLM(tiny_config()).named_parameters()]
    every = universal_checkpoint_info(64, names)
    assert every == universal_checkpoint_info(64)
    gate_only = universal_checkpoint_info(64, list(GATE))
    assert gate_only["tp_replicated_parameter_patterns"] == [r".*early_exit_gate\..*"]
    assert gate_only["vocabulary_parameter_patterns"] == []
    assert gate_only["parameter_with_row_parallelism_patterns"] == []


def test_the_gate_stage_hands_off_from_a_weights_only_checkpoint(tmp_path):
    """The SFT -> gate training hand-off takes weights only: it needs no optimizer.safetensors."""
    from ouro_train.train.stage import handoff_source

    sft_final = tmp_path / "sft"
    sft_final.mkdir()
    (sft_final / "model.safetensors").write_bytes(b"")
    cfg = compose_config(["stage=gate_training", f"checkpoint.init_from={sft_final}"])
    assert handoff_source(cfg) == {}
    assert not Path(sft_final / "optimizer.safetensors").exists()
