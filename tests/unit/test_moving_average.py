"""The one smoothing of loss curves (train/report.py), used by a run's plot and the pipeline report."""

import pytest

from ouro_train.pipeline import report as pipeline_report
from ouro_train.train.report import moving_average


def test_trailing_mean_over_at_most_window_values():
    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert moving_average([4.0, 2.0], 10) == [4.0, 3.0]  # shorter than the window: mean so far
    assert moving_average([], 10) == []
    values = [float(v * v % 7) for v in range(40)]
    assert moving_average(values) == moving_average(values, 10)
    assert moving_average(values)[-1] == pytest.approx(sum(values[-10:]) / 10)


def test_the_pipeline_report_smooths_with_the_same_function():
    assert pipeline_report.moving_average is moving_average
