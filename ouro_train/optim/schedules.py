"""Learning-rate schedules as pure functions of the step, so nothing but the step is saved:
`lr_at` gives a step's learning rate under `schedule.kind` (constant, cosine or wsd, each after a
linear warmup) and `wsd_decay_steps` the length of wsd's decay.
"""

from __future__ import annotations

import math

from ouro_train.config.schema import ScheduleConfig


def _decay(progress: float, shape: str) -> float:
    """progress in [0, 1] -> remaining fraction of (peak - final), 1 -> 0."""
    progress = min(max(progress, 0.0), 1.0)
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "sqrt":
        return 1.0 - math.sqrt(progress)
    raise ValueError(f"unknown decay shape {shape!r}")


def wsd_decay_steps(cfg: ScheduleConfig, total_steps: int) -> int:
    """The steps of wsd's decay: `decay_steps`, or else `decay_fraction` of the run."""
    return cfg.decay_steps if cfg.decay_steps is not None else round(cfg.decay_fraction * total_steps)


def lr_at(step: int, peak_lr: float, total_steps: int, cfg: ScheduleConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `total_steps` steps.

    Every schedule starts with a linear warmup from 0 to the peak over `warmup_steps`, then:
      constant  the peak until the end;
      cosine    cosine from the peak (end of warmup) to `final_lr` at the last step;
      wsd       warmup-stable-decay: the peak, then over the last `decay_steps` (default
                `decay_fraction` x steps) a decay to `final_lr` shaped linear | cosine | sqrt.
                `sqrt` is "1 - sqrt" (lr drops fastest at the end), after Hagele et al. 2024."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return peak_lr * (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return peak_lr
    last = max(total_steps - 1, 1)
    if cfg.kind == "cosine":
        span = max(last - cfg.warmup_steps, 1)
        remaining = _decay((step - cfg.warmup_steps) / span, "cosine")
        return cfg.final_lr + (peak_lr - cfg.final_lr) * remaining
    if cfg.kind == "wsd":
        decay_steps = wsd_decay_steps(cfg, total_steps)
        decay_start = total_steps - decay_steps
        if decay_steps == 0 or step < decay_start:
            return peak_lr
        remaining = _decay((step - decay_start + 1) / decay_steps, cfg.decay_shape)
        return cfg.final_lr + (peak_lr - cfg.final_lr) * remaining
    raise ValueError(f"unknown schedule kind {cfg.kind!r}")
