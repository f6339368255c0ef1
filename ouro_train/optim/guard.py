"""The training stability guard (`StabilityGuard`): each step, before the optimizer applies it,
the same verdict on every rank skips an update whose loss is non-finite or spikes or that AdamW
could make too large for the weights (`adamw_update_bound`), ends the run when the weights are no
longer finite, and stops it after too many bad steps in a row (`TrainingDiverged`).
"""

from __future__ import annotations

import functools
import math
from collections import deque

from ouro_train.config.schema import GuardConfig

NONFINITE_LOSS = "nonfinite_loss"
NONFINITE_GRAD = "nonfinite_grad_norm"
LOSS_SPIKE = "loss_spike"
UPDATE_TOO_LARGE = "update_too_large"
NONFINITE_WEIGHTS = "nonfinite_weights"
REASONS = (NONFINITE_LOSS, NONFINITE_GRAD, LOSS_SPIKE, UPDATE_TOO_LARGE, NONFINITE_WEIGHTS)


class TrainingDiverged(RuntimeError):
    """Too many bad steps in a row: the run stops (exit status 3) rather than train on garbage.

    `reason`: the last bad step's; the stage adds where to roll back to (`rollback_checkpoint`,
    `rollback_lr`, the peak learning rate it suggests) so that the CLI can print the command."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.rollback_checkpoint = None
        self.rollback_lr: float | None = None
        self.rollback_note = ""


@functools.lru_cache
def adamw_update_bound(beta1: float, beta2: float) -> float | None:
    """The largest |m^_t / sqrt(v^_t)| any element of Adam's update can reach, at any step t, for
    any gradients (None: unbounded, when beta1**2 >= beta2).

    With the bias corrections, m^_t = sum_i a_i g_i and v^_t = sum_i b_i g_i^2 with a_i =
    (1-b1) b1^(t-i) / (1-b1^t) and b_i = (1-b2) b2^(t-i) / (1-b2^t). Cauchy-Schwarz gives
    |m^_t| <= sqrt(sum_i a_i^2 / b_i) sqrt(v^_t), and sum_i a_i^2 / b_i = K_t (1 - r^t) / (1 - r)
    with r = b1^2 / b2 and K_t = (1-b1)^2 (1-b2^t) / ((1-b1^t)^2 (1-b2)). Its supremum over t
    is taken numerically (the terms settle long before t = 10,000). For (0.9, 0.95) it is 1.165
    (exactly 1 at t = 1, where m^ = g and v^ = g^2); eps only makes the update smaller."""
    if beta2 <= 0:
        return None
    r = beta1**2 / beta2
    if r >= 1:
        return None
    worst = 0.0
    for t in range(1, 10_001):
        k = (1 - beta1) ** 2 * (1 - beta2**t) / ((1 - beta1**t) ** 2 * (1 - beta2))
        worst = max(worst, k * (1 - r**t) / (1 - r))
    worst = max(worst, (1 - beta1) ** 2 / ((1 - beta2) * (1 - r)))  # the limit t -> infinity
    return math.sqrt(worst)


class StabilityGuard:
    """Skip bad updates on every rank, stop after too many in a row.

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

    A good loss is not enough: the loss is computed before the update, so an absurd learning rate
    would pass it and write blown-up weights into the next checkpoint. The update itself is judged
    too, before it is applied: the trainer hands over the parameter norm ||w|| and the largest
    relative update ||dw|| / ||w|| that AdamW can make at this step's learning rate
    (`adamw_update_bound`: each element of Adam's normalised update m^/(sqrt(v^)+eps) is bounded by a
    constant set by the betas alone, whatever the gradient). An update that could be larger than
    `max_update_ratio` times the weights is skipped like a bad loss; weights that are no longer finite
    end the run at once (no skipped update can repair them). So every accepted step leaves weights
    that can be trained on, and `health()` says why: what a checkpoint records."""

    def __init__(self, cfg: GuardConfig) -> None:
        self.cfg = cfg
        self.window: deque[float] = deque(maxlen=cfg.window)
        self.counts = dict.fromkeys(REASONS, 0)
        self.consecutive_bad = 0
        self.first_bad_step: int | None = None
        # The figures of the last accepted step (None: none yet, the weights are the initial ones).
        self.last_accepted: dict | None = None
        self.checks: dict = {}

    def verdict(self, loss: float, param_norm: float | None = None, update_ratio: float | None = None) -> str | None:
        """Why the update of a step must be skipped, or None. `loss`: the step's global loss;
        `param_norm`: ||w|| of the trained weights before the update; `update_ratio`: the largest
        ||dw|| / ||w|| the optimizer can make at this step (None: not judged)."""
        self.checks = {"loss": loss, "param_norm": param_norm, "update_ratio_max": update_ratio}
        if not self.cfg.enabled:
            return None
        if param_norm is not None and not math.isfinite(param_norm):
            return NONFINITE_WEIGHTS
        if not math.isfinite(loss):
            return NONFINITE_LOSS
        if (
            update_ratio is not None
            and self.cfg.max_update_ratio > 0
            and not update_ratio <= self.cfg.max_update_ratio  # also NaN
        ):
            return UPDATE_TOO_LARGE
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
            self.last_accepted = {"step": step, **self.checks}
            return
        self.counts[reason] += 1
        self.consecutive_bad += 1
        self.first_bad_step = self.first_bad_step or step
        if reason == NONFINITE_WEIGHTS:
            raise TrainingDiverged(
                f"the weights hold NaN or inf at step {step} (parameter norm {self.checks.get('param_norm')}); no "
                "update can repair them and none is written to a checkpoint",
                reason,
            )
        if self.consecutive_bad >= self.cfg.max_consecutive_bad:
            detail = f"loss {loss:.4g}"
            if reason == UPDATE_TOO_LARGE:
                detail += (
                    f", an update of up to {self.checks['update_ratio_max']:.3g} x the weights' norm at this "
                    f"learning rate, limit guard.max_update_ratio={self.cfg.max_update_ratio:g}"
                )
            raise TrainingDiverged(
                f"{self.consecutive_bad} bad steps in a row (steps {self.first_bad_step}-{step}, the last: "
                f"{reason.replace('_', ' ')}, {detail}); their updates were skipped, so the weights are those "
                f"of step {self.first_bad_step - 1}. guard.max_consecutive_bad / guard.spike_zscore / "
                "guard.max_update_ratio tune the guard (guard.enabled=false turns it off)",
                reason,
            )

    def reset_streak(self) -> None:
        """A rollback: the bad steps counted so far belong to the abandoned run (counts are kept)."""
        self.consecutive_bad = 0
        self.first_bad_step = None

    @property
    def healthy(self) -> bool:
        """No bad step since the last accepted one."""
        return self.consecutive_bad == 0

    def health(self, step: int) -> dict:
        """Why the weights at `step` can be trained on (recorded in each checkpoint). `healthy`:
        every update they hold passed the guard (while it is on, always: a bad step's update is
        never applied, and no checkpoint is written from non-finite weights); `weights_of_step`:
        the last accepted step (0: the initial weights); `bad_steps_pending`: bad steps skipped
        since then (a rollback prefers a checkpoint from before such a stretch)."""
        last = self.last_accepted
        if not self.cfg.enabled:
            why = "guard disabled (guard.enabled=false): no update was checked"
        elif last is None:
            why = "no update accepted yet: the weights are the initial ones"
        else:
            figures = [f"loss {last['loss']:.4g}"]
            if last.get("param_norm") is not None:
                figures.append(f"parameter norm {last['param_norm']:.4g}")
            if last.get("update_ratio_max") is not None:
                figures.append(
                    f"update at most {last['update_ratio_max']:.3g} x the weights (limit {self.cfg.max_update_ratio:g})"
                )
            why = f"the weights are those of step {last['step']}, whose update passed the guard: " + ", ".join(figures)
        if self.consecutive_bad:
            why += f"; steps {self.first_bad_step}-{step} were bad and skipped"
        return {
            "healthy": self.cfg.enabled,
            "weights_of_step": 0 if last is None else last["step"],
            "bad_steps_pending": self.consecutive_bad,
            "why": why,
        }

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
            "last_accepted": self.last_accepted,
        }

    def load_state_dict(self, state: dict | None) -> None:
        if not state:  # a checkpoint written before the guard existed
            return
        self.window = deque(state["window"], maxlen=self.cfg.window)
        self.counts = dict.fromkeys(REASONS, 0) | state["counts"]
        self.consecutive_bad = state["consecutive_bad"]
        self.first_bad_step = state["first_bad_step"]
        self.last_accepted = state.get("last_accepted")
