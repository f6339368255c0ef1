"""The training stability guard: skip bad updates on every rank, stop after too many in a row.

Each step the trainer hands the guard the step's loss, already summed over every data-parallel
rank by the all-reduce it needs for its metrics anyway, so every rank sees the same number and
takes the same decision without another collective. A NaN or inf on any rank makes the sum
non-finite everywhere; the gradient norm the engine reports is global too. The verdict is taken
*before* the optimizer step (the engine is told to skip it), so a bad batch never reaches the
weights or the Adam moments. The step counter, the LR schedule and the data position still
advance, identically on all ranks: the bad batch is consumed, not retried (as Megatron-LM does
with its skipped iterations).

Loss spikes are judged against the losses of recently accepted steps (a z-score with a ratio
floor, see GuardConfig). The guard's state (window and counters) is saved in train_state.json so
that a resumed run judges the next steps exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import math
from collections import deque

from ouro_train.config.schema import GuardConfig

NONFINITE_LOSS = "nonfinite_loss"
NONFINITE_GRAD = "nonfinite_grad_norm"
LOSS_SPIKE = "loss_spike"
REASONS = (NONFINITE_LOSS, NONFINITE_GRAD, LOSS_SPIKE)


class TrainingDiverged(RuntimeError):
    """Too many bad steps in a row: the run stops (exit status 3) rather than train on garbage."""


class StabilityGuard:
    def __init__(self, cfg: GuardConfig) -> None:
        self.cfg = cfg
        self.window: deque[float] = deque(maxlen=cfg.window)
        self.counts = dict.fromkeys(REASONS, 0)
        self.consecutive_bad = 0
        self.first_bad_step: int | None = None

    def verdict(self, loss: float) -> str | None:
        """Why the update of a step with this (global) loss must be skipped, or None."""
        if not self.cfg.enabled:
            return None
        if not math.isfinite(loss):
            return NONFINITE_LOSS
        if self.cfg.spike_zscore > 0 and len(self.window) >= self.cfg.min_history:
            mean = sum(self.window) / len(self.window)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.window) / len(self.window))
            if loss > mean * self.cfg.spike_min_ratio and (std == 0 or (loss - mean) / std > self.cfg.spike_zscore):
                return LOSS_SPIKE
        return None

    def record(self, step: int, loss: float, reason: str | None) -> None:
        """After the step: count it; raise TrainingDiverged after max_consecutive_bad bad ones."""
        if reason is None:
            self.window.append(loss)
            self.consecutive_bad = 0
            self.first_bad_step = None
            return
        self.counts[reason] += 1
        self.consecutive_bad += 1
        self.first_bad_step = self.first_bad_step or step
        if self.consecutive_bad >= self.cfg.max_consecutive_bad:
            raise TrainingDiverged(
                f"{self.consecutive_bad} bad steps in a row (steps {self.first_bad_step}-{step}, the last: "
                f"{reason.replace('_', ' ')}, loss {loss:.4g}); their updates were skipped, so the weights are those "
                f"of step {self.first_bad_step - 1}. Lower optim.lr or fix the data, and resume from the last "
                "checkpoint; guard.max_consecutive_bad / guard.spike_zscore tune the guard (guard.enabled=false "
                "turns it off)"
            )

    @property
    def healthy(self) -> bool:
        """No bad step since the last accepted one."""
        return self.consecutive_bad == 0

    def metrics(self) -> dict:
        return {
            "guard/skipped_steps": sum(self.counts.values()),
            **{f"guard/{reason}": count for reason, count in self.counts.items()},
            "guard/consecutive_bad": self.consecutive_bad,
        }

    def state_dict(self) -> dict:
        return {
            "window": list(self.window),
            "counts": dict(self.counts),
            "consecutive_bad": self.consecutive_bad,
            "first_bad_step": self.first_bad_step,
        }

    def load_state_dict(self, state: dict | None) -> None:
        if not state:  # a checkpoint written before the guard existed
            return
        self.window = deque(state["window"], maxlen=self.cfg.window)
        self.counts = dict.fromkeys(REASONS, 0) | state["counts"]
        self.consecutive_bad = state["consecutive_bad"]
        self.first_bad_step = state["first_bad_step"]
