import math

import pytest

from ouro_train.config import ScheduleConfig
from ouro_train.optim.schedules import lr_at

PEAK = 3e-4


def lrs(cfg: ScheduleConfig, steps: int) -> list[float]:
    return [lr_at(step, PEAK, steps, cfg) for step in range(steps)]


def test_linear_warmup_then_constant():
    values = lrs(ScheduleConfig(kind="constant", warmup_steps=4), 10)
    assert values[:4] == pytest.approx([PEAK * k / 4 for k in (1, 2, 3, 4)])
    assert values[4:] == pytest.approx([PEAK] * 6)


def test_cosine_reaches_final_lr_at_last_step_and_is_monotone():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=2, final_lr=3e-5)
    values = lrs(cfg, 20)
    assert values[1] == pytest.approx(PEAK)
    assert values[-1] == pytest.approx(3e-5)
    assert all(a >= b for a, b in zip(values[1:], values[2:]))
    # halfway through the decay, halfway between peak and final
    assert lr_at(2 + 17 / 2, PEAK, 20, cfg) == pytest.approx((PEAK + 3e-5) / 2)


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt"])
def test_wsd_holds_the_peak_then_decays_over_the_last_steps(shape):
    cfg = ScheduleConfig(kind="wsd", warmup_steps=2, decay_steps=4, decay_shape=shape, final_lr=0.0)
    values = lrs(cfg, 12)
    assert values[2:8] == pytest.approx([PEAK] * 6)
    assert values[-1] == pytest.approx(0.0, abs=1e-12)
    decay = values[8:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    progress = 2 / 4  # step 9 is the second of four decay steps
    expected = {
        "linear": 1 - progress,
        "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
        "sqrt": 1 - math.sqrt(progress),
    }[shape]
    assert values[9] == pytest.approx(PEAK * expected)


def test_wsd_decay_fraction_default():
    cfg = ScheduleConfig(kind="wsd", decay_fraction=0.25)
    values = lrs(cfg, 100)
    assert values[74] == pytest.approx(PEAK) and values[75] < PEAK
