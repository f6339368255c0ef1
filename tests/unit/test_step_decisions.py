"""Callbacks run in their declared order, see the step's metrics read-only, and every decision
ranks must share at a step boundary (signal, time-based checkpoint) costs one collective (none
on one rank)."""

import itertools
import os
import signal

import pytest
import torch
from tiny_models import TRAINABLE, tiny_config

from ouro_train.config import Config, TrainConfig
from ouro_train.config.resolve import resolve
from ouro_train.model import LoopLM
from ouro_train.train.callbacks import Throughput
from ouro_train.train.trainer import Callback, Trainer


def trainer(steps: int = 3, callbacks=()) -> Trainer:
    torch.manual_seed(0)
    cfg = Config(model=tiny_config(**TRAINABLE), train=TrainConfig(steps=steps, micro_batch_size=2, seq_len=16))
    tokens = torch.randint(0, 64, (2, 17))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    return Trainer(cfg, LoopLM(cfg.model), itertools.repeat(batch), callbacks=list(callbacks), resolved=resolve(cfg))


class Recorder(Callback):
    def __init__(self, name: str, log: list, order: int = Callback.LOG, save_at: int | None = None) -> None:
        self.name, self.log, self.order, self.save_at = name, log, order, save_at

    def step_metrics(self, trainer, metrics):
        self.log.append((self.name, "metrics"))
        return {}

    def on_step_end(self, trainer, metrics):
        self.log.append((self.name, "end", "tflops_per_device" in metrics))
        with pytest.raises(TypeError):
            metrics["loss"] = 0.0  # read-only for observers

    def wants_save(self, trainer):
        return trainer.state.step == self.save_at

    def on_step_decision(self, trainer, decision):
        self.log.append((self.name, "decision", decision.save, decision.stop))


def test_order_not_insertion_decides_and_producers_come_first():
    log: list = []
    saver = Recorder("saver", log, order=Callback.SAVE, save_at=1)
    logger = Recorder("logger", log)
    t = trainer(steps=1, callbacks=[saver, logger, Throughput(1e9, 1, None)])
    t.fit()
    assert log == [
        ("logger", "metrics"),
        ("saver", "metrics"),
        ("logger", "end", True),  # Throughput's metrics (order METRICS) are there for every observer
        ("saver", "end", True),
        ("logger", "decision", True, False),  # one rank wanting a save is a save for all
        ("saver", "decision", True, False),
    ]


@pytest.mark.parametrize("world_size", [2, 1])
def test_one_collective_per_step_for_signal_and_time_based_save(monkeypatch, world_size):
    """Several ranks: one 2-number all-reduce per step. One rank: none (it agrees with itself)."""
    log: list = []
    t = trainer(steps=4, callbacks=[Recorder("r", log, save_at=2)])
    monkeypatch.setattr(t.engine, "world_size", world_size)
    calls = []
    real = t.engine.all_reduce_max
    monkeypatch.setattr(t.engine, "all_reduce_max", lambda tensor: calls.append(tensor.numel()) or real(tensor))

    class SignalAtStep3(Callback):
        def on_step_end(self, trainer, metrics):
            if metrics["step"] == 3:
                os.kill(os.getpid(), signal.SIGUSR1)

    t.callbacks.append(SignalAtStep3())
    t.fit()
    assert t.state.step == 3 and t.stopped_by_signal == signal.SIGUSR1
    assert calls == ([2, 2, 2] if world_size > 1 else [])  # nothing else is reduced by max
    decisions = [entry[2:] for entry in log if entry[1] == "decision"]
    assert decisions == [(False, False), (True, False), (False, True)]
