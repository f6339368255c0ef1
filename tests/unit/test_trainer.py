import itertools

import pytest
import torch
from tiny_models import TRAINABLE, tiny_config

from ouro_train.config import Config, ObjectiveConfig, OptimConfig, ScheduleConfig, TrainConfig
from ouro_train.config.resolve import resolve
from ouro_train.model import LoopLM
from ouro_train.train.trainer import Trainer

VOCAB = 64


def config(**train) -> Config:
    return Config(
        model=tiny_config(**TRAINABLE, recurrent_steps=4),
        objective=ObjectiveConfig(beta=0.05),
        optim=OptimConfig(lr=3e-3),
        schedule=ScheduleConfig(kind="constant", warmup_steps=5),
        train=TrainConfig(**({"steps": 10, "micro_batch_size": 4, "seq_len": 32} | train)),
    )


def batch(seed: int, size: int = 4, seq: int = 32, masked: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (size, seq + 1), generator=g)
    out = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    if masked:
        out["loss_mask"] = torch.rand(size, seq, generator=g) < 0.3 + 0.5 * torch.arange(size)[:, None] / size
    return out


@pytest.mark.slow
def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    cfg = config(steps=60)  # the loss falls below a tenth of the first at step 41
    fixed = batch(0)
    trainer = Trainer(cfg, LoopLM(cfg.model), itertools.repeat(fixed), resolved=resolve(cfg))
    first = trainer.train_step()
    for _ in range(cfg.train.steps - 1):
        last = trainer.train_step()
    assert last["loss"] < 0.1 * first["loss"], (first["loss"], last["loss"])
    assert last["ce_step4"] < 0.1 * first["ce_step4"]
    assert sum(last[f"p_step{t}"] for t in range(1, 5)) == pytest.approx(1.0, abs=1e-5)


def test_gradient_accumulation_equals_one_big_batch_with_uneven_loss_masks():
    torch.manual_seed(1)
    full = batch(3, size=4, masked=True)
    halves = [{k: v[:2] for k, v in full.items()}, {k: v[2:] for k, v in full.items()}]
    assert halves[0]["loss_mask"].sum() != halves[1]["loss_mask"].sum()  # uneven on purpose
    model = LoopLM(config().model)
    runs = []
    for accum, stream in ((1, iter([full])), (2, iter(halves))):
        cfg = config(grad_accum_steps=accum, micro_batch_size=4 // accum)
        trainer = Trainer(cfg, LoopLM(cfg.model), stream, resolved=resolve(cfg))
        trainer.model.load_state_dict(model.state_dict())
        runs.append((trainer.train_step(), trainer.model.state_dict()))
    (m1, sd1), (m2, sd2) = runs
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)
    # Adam's first update is ~lr * g / |g| per element (lr = 6e-4 here, first warmup step), so a
    # gradient element near eps turns summation-order noise (1e-9) into ~1e-6 of movement.
    # 1e-5 is 2% of one step: an error in token normalisation would move whole tensors by ~lr.
    for key in sd1:
        torch.testing.assert_close(sd1[key], sd2[key], atol=1e-5, rtol=1e-5)


def test_gate_objective_trains_only_the_exit_gate():
    torch.manual_seed(2)
    cfg = config()
    cfg.objective = ObjectiveConfig(kind="gate")
    trainer = Trainer(cfg, LoopLM(cfg.model), itertools.repeat(batch(4)), resolved=resolve(cfg))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.train_step()
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"model.early_exit_gate.weight", "model.early_exit_gate.bias"}
    assert metrics["grad_norm"] > 0


def test_metrics_schedule_and_bf16():
    torch.manual_seed(3)
    cfg = config(precision="bf16", steps=8)
    trainer = Trainer(
        cfg,
        LoopLM(cfg.model),
        (batch(i) for i in itertools.count()),
        eval_batches=lambda: [batch(99)],
        resolved=resolve(cfg),
    )
    lrs = [trainer.train_step()["lr"] for _ in range(6)]
    assert lrs == pytest.approx([3e-3 * k / 5 for k in (1, 2, 3, 4, 5)] + [3e-3])
    final = trainer.fit()
    assert trainer.state.step == 8 and trainer.state.tokens == 8 * 4 * 32
    assert {"eval/loss", "eval/ce_step1", "eval/ce_step4", "eval/p_step4", "eval/entropy"} <= set(final)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in final.items() if k.startswith("eval/"))


def test_a_slow_loader_shows_in_the_step_metrics_and_the_console_line():
    """The host's wait for the data is measured at every step and named on the console line where
    it takes a noticeable share of the step (a loader that cannot keep up)."""
    import time

    from ouro_train.train.callbacks import format_metrics

    cfg = config(micro_batch_size=2, grad_accum_steps=2)

    def batches(delay: float):
        for seed in itertools.count():
            time.sleep(delay)
            yield batch(seed, size=2)

    torch.manual_seed(0)
    slow = Trainer(cfg, LoopLM(cfg.model), batches(0.25), resolved=resolve(cfg)).train_step()
    assert slow["data_wait_s"] >= 2 * 0.25  # two micro-batches
    assert slow["data_wait_s"] <= slow["step_time_s"]
    assert "data wait" in format_metrics(slow)
    fast = Trainer(cfg, LoopLM(cfg.model), batches(0.0), resolved=resolve(cfg))
    fast.train_step()
    assert 0 <= fast.train_step()["data_wait_s"] < 0.1  # (a loaded machine's pauses, not a loader)
    # Below 5% of the step the line does not name it.
    assert "data wait" not in format_metrics(slow | {"data_wait_s": 0.04 * slow["step_time_s"]})
