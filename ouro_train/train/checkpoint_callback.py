"""Periodic checkpoints as a trainer callback (runs on every rank: saving is collective)."""

from __future__ import annotations

import time
from collections.abc import Callable

from ouro_train.checkpoint.manager import Checkpointer
from ouro_train.train.trainer import Callback, StepDecision, Trainer


class CheckpointCallback(Callback):
    # After every logger: a step is in metrics.jsonl before any checkpoint holds it, so a kill
    # between the two leaves the step logged, and the resume (from the checkpoint before) replaces
    # that line.
    order = Callback.SAVE

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
        self.last_path = None  # the newest checkpoint this run saved

    def wants_save(self, trainer: Trainer) -> bool:
        """This rank's clock; the trainer's step decision saves when any rank's interval has passed."""
        return self.every_seconds > 0 and time.monotonic() - self.last_save >= self.every_seconds

    def on_step_decision(self, trainer: Trainer, decision: StepDecision) -> None:
        if decision.save or (self.every_steps > 0 and trainer.state.step % self.every_steps == 0):
            self.save(trainer)

    def save(self, trainer: Trainer, final: bool = False) -> None:
        if self.last_step_saved == trainer.state.step and not final:
            return
        with trainer.phase("ouro/checkpoint"):
            self.last_path = self.checkpointer.save(trainer, self.loader_state(), final=final)
        self.last_save = time.monotonic()
        self.last_step_saved = trainer.state.step
