"""Prediction accuracy per worker: finish errors and the online speed correction."""
from __future__ import annotations

import math

import pytest

from instgenie.services.scheduler.predictions import WorkerAccuracy, summarise


def test_speed_follows_the_measured_to_profiled_ratio():
    acc = WorkerAccuracy(alpha=0.2)
    assert acc.speed == 1.0
    acc.record_compute(1.0, 1.5)
    assert acc.speed == pytest.approx(1.5)  # the first sample counts fully
    for _ in range(60):
        acc.record_compute(1.0, 0.8)
    assert acc.speed == pytest.approx(0.8, rel=1e-3)


def test_one_outlier_moves_the_speed_by_at_most_alpha_in_log_space_and_within_bounds():
    acc = WorkerAccuracy(alpha=0.1, bounds=(0.5, 2.0))
    for _ in range(50):
        acc.record_compute(1.0, 1.0)
    acc.record_compute(1.0, 1000.0)  # clipped to 2.0 first
    assert acc.speed == pytest.approx(math.exp(0.1 * math.log(2.0)))


def test_runs_too_short_to_time_are_ignored():
    acc = WorkerAccuracy(min_compute_seconds=0.01)
    acc.record_compute(0.001, 0.005)
    acc.record_compute(0.0, 1.0)
    assert acc.samples == 0 and acc.speed == 1.0


def test_finish_error_summary_and_reset():
    acc = WorkerAccuracy(window=3)
    for p, m in ((1.0, 2.0), (1.0, 1.0), (2.0, 1.0), (1.0, 1.25)):
        acc.record_finish(p, m)
    s = acc.summary()  # the window keeps the last three
    assert s.edits == 3 and acc.total == 4
    assert s.mean_error_seconds == pytest.approx((0.0 - 1.0 + 0.25) / 3)
    assert s.mean_abs_relative_error == pytest.approx((0.0 + 1.0 + 0.2) / 3)
    assert s.p95_abs_relative_error == pytest.approx(1.0)
    acc.record_compute(1.0, 2.0)
    acc.reset()
    assert acc.summary().edits == 0 and acc.speed == 1.0
    assert summarise([]).edits == 0
