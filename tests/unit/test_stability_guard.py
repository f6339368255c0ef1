"""The stability guard: a bad step's update is skipped (weights and Adam state untouched, the
counters in the metrics), spikes are judged against recent losses, and too many bad steps in a
row stop the run. Multi-rank agreement is in tests/distributed/test_guard_ranks.py."""

import itertools
import math

import pytest
import torch

from ouro_train.config import Config, GuardConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig
from ouro_train.config.resolve import resolve
from ouro_train.model import LoopLM
from ouro_train.optim.guard import LOSS_SPIKE, NONFINITE_GRAD, NONFINITE_LOSS, StabilityGuard, TrainingDiverged
from ouro_train.train.trainer import Trainer

VOCAB = 64


def config(**guard) -> Config:
    return Config(
        model=ModelConfig(
            name="t", vocab_size=VOCAB, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=96
        ),
        optim=OptimConfig(lr=1e-2),
        schedule=ScheduleConfig(kind="constant", warmup_steps=0),
        train=TrainConfig(steps=20, micro_batch_size=2, seq_len=16, grad_accum_steps=2),
        guard=GuardConfig(**guard),
    )


def batches():
    g = torch.Generator().manual_seed(0)
    while True:
        tokens = torch.randint(0, VOCAB, (2, 17), generator=g)
        yield {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def snapshot(trainer: Trainer) -> tuple[dict, dict]:
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    state = trainer.engine.optimizer.state_dict()["state"]
    moments = {(i, k): v.clone() for i, s in state.items() for k, v in s.items() if torch.is_tensor(v)}
    return weights, moments


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_verdicts_and_the_spike_window():
    guard = StabilityGuard(GuardConfig(min_history=5, window=10, spike_zscore=4.0, spike_min_ratio=1.1))
    assert guard.verdict(float("nan")) == NONFINITE_LOSS and guard.verdict(float("inf")) == NONFINITE_LOSS
    assert guard.verdict(50.0) is None  # too little history to judge a spike
    for step, loss in enumerate([5.0, 5.1, 4.9, 5.05, 4.95], 1):
        assert guard.verdict(loss) is None
        guard.record(step, loss, None)
    assert guard.verdict(5.2) is None  # noise: z ~ 3
    assert guard.verdict(9.0) == LOSS_SPIKE
    flat = StabilityGuard(GuardConfig(min_history=2, window=4, spike_zscore=4.0, spike_min_ratio=1.1))
    for step in (1, 2, 3):
        flat.record(step, 3.0, None)
    assert flat.verdict(3.01) is None  # std 0, but below the ratio floor: not a spike
    assert flat.verdict(3.5) == LOSS_SPIKE
    assert StabilityGuard(GuardConfig(enabled=False)).verdict(float("nan")) is None


def test_bad_steps_in_a_row_stop_and_the_state_round_trips():
    guard = StabilityGuard(GuardConfig(max_consecutive_bad=3, min_history=1, window=4))
    guard.record(1, 4.0, None)
    guard.record(2, float("nan"), NONFINITE_LOSS)
    guard.record(3, 4.0, None)  # an accepted step resets the streak
    guard.record(4, 1e9, LOSS_SPIKE)
    guard.record(5, 4.0, NONFINITE_GRAD)
    restored = StabilityGuard(guard.cfg)
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict() and not restored.healthy
    assert restored.metrics() == {
        "guard/skipped_steps": 3,
        "guard/nonfinite_loss": 1,
        "guard/nonfinite_grad_norm": 1,
        "guard/loss_spike": 1,
        "guard/update_too_large": 0,
        "guard/nonfinite_weights": 0,
        "guard/consecutive_bad": 2,
    }
    with pytest.raises(TrainingDiverged, match=r"3 bad steps in a row \(steps 4-6.*weights are those of step 3"):
        restored.record(6, float("nan"), NONFINITE_LOSS)


@pytest.mark.parametrize("poison", ["loss", "grad"])
def test_a_poisoned_step_leaves_weights_and_adam_state_untouched(poison):
    torch.manual_seed(0)
    cfg = config()
    trainer = Trainer(cfg, LoopLM(cfg.model), batches(), resolved=resolve(cfg))
    for _ in range(3):
        assert trainer.train_step()["skipped"] == 0
        trainer.guard.record(trainer.state.step, 0.0, trainer.pending_verdict)
    before = snapshot(trainer)
    if poison == "loss":  # NaN in the forward of the second micro-batch only
        calls = itertools.count()
        hook = trainer.model.model.embed_tokens.register_forward_hook(
            lambda m, i, out: out * float("nan") if next(calls) == 1 else None
        )
    else:  # a finite loss whose gradient is inf
        hook = trainer.model.lm_head.weight.register_hook(lambda g: g * float("inf"))
    metrics = trainer.train_step()
    hook.remove()
    assert metrics["skipped"] == 1
    assert metrics["skip_reason"] == (NONFINITE_LOSS if poison == "loss" else NONFINITE_GRAD)
    assert math.isfinite(metrics["loss"]) == (poison == "grad")
    assert trainer.state.step == 4  # the step counter (and with it the LR schedule) advances
    assert_same(before[0], snapshot(trainer)[0])
    assert_same(before[1], snapshot(trainer)[1])
    assert all(p.grad is None for p in trainer.model.parameters())  # nothing carried into the next step
    trainer.guard.record(trainer.state.step, metrics["loss"], trainer.pending_verdict)
    after = trainer.train_step()
    assert after["skipped"] == 0 and math.isfinite(after["loss"])
    assert not all(torch.equal(before[0][k], v) for k, v in trainer.model.state_dict().items())


def test_fit_reports_the_counters_and_stops_after_too_many_bad_steps():
    torch.manual_seed(0)
    cfg = config(max_consecutive_bad=2)
    trainer = Trainer(cfg, LoopLM(cfg.model), batches(), resolved=resolve(cfg))
    seen = []

    class Record:
        def on_train_start(self, trainer): ...

        def on_step_end(self, trainer, metrics):
            seen.append(metrics)

        def on_train_end(self, trainer):
            seen.append("end")

    trainer.callbacks.append(Record())
    calls = itertools.count()
    trainer.model.model.embed_tokens.register_forward_hook(
        lambda m, i, out: out * float("nan") if next(calls) >= 6 else None  # from step 4 on
    )
    with pytest.raises(TrainingDiverged, match="2 bad steps in a row"):
        trainer.fit()
    assert [m["skipped"] for m in seen[:-1]] == [0, 0, 0, 1, 1]
    assert seen[-2]["guard/nonfinite_loss"] == 2 and seen[-2]["guard/consecutive_bad"] == 2
    assert seen[-1] == "end"  # loggers and the progress bar are closed on the way out
