"""Periodic checkpoints as a trainer callback (runs on every rank: saving is collective)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ouro_train.checkpoint.manager import Checkpointer
from ouro_train.train.trainer import Callback, Trainer


class CheckpointCallback(Callback):
    def __init__(
        self,
        checkpointer: Checkpointer,
        loader_state: Callable[[], dict | None],
        every_steps: int,
        every_minutes: float,
    ) -> None:
        self.checkpointer = checkpointer
        self.loader_state = loader_state
        self.every_steps = every_steps
        self.every_seconds = every_minutes * 60
        self.last_save = time.monotonic()
        self.last_step_saved: int | None = None

    def on_step_end(self, trainer: Trainer, metrics: dict) -> None:
        due = self.every_steps > 0 and trainer.state.step % self.every_steps == 0
        if self.every_seconds > 0:
            # Clocks differ between ranks: save when any rank's interval has passed, all together.
            late = time.monotonic() - self.last_save >= self.every_seconds
            late = bool(trainer.engine.all_reduce_max(torch.tensor(float(late), device=trainer.device)) > 0)
            due = due or late
        if due:
            self.save(trainer)

    def save(self, trainer: Trainer, final: bool = False) -> None:
        if self.last_step_saved == trainer.state.step and not final:
            return
        self.checkpointer.save(trainer, self.loader_state(), final=final)
        self.last_save = time.monotonic()
        self.last_step_saved = trainer.state.step
