"""How good the scheduler's predictions are, per worker, and the online correction that keeps them honest.

Two measurements per finished edit:
* the *finish error*: predicted seconds at placement (what the gateway is told) against the measured seconds
  from placement to the result passing through the scheduler. Later arrivals that join the batch make every
  edit slower than predicted at its placement, so under load this error is biased upwards even for a perfect
  cost model; it is what callers experience, so it is what we report.
* the *compute ratio*: the edit's measured denoising time (first to last step event) over the time the cost
  model gives for the steps it ran in the batches it ran in (the scheduler sees every step). Arrivals do not
  bias it: it measures the device against its profile. Its moving geometric mean is the worker's `speed`,
  which scales that worker's step times in every prediction (a device 1.5x slower than profiled converges to
  speed 1.5).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class AccuracySummary:
    edits: int
    mean_error_seconds: float  # measured - predicted
    mean_abs_error_seconds: float
    mean_abs_relative_error: float  # |measured - predicted| / measured
    p95_abs_relative_error: float
    speed: float


class WorkerAccuracy:
    """Finish errors over the last `window` edits; the compute correction as an EWMA of log ratios."""

    def __init__(self, window: int = 512, alpha: float = 0.1, bounds: tuple[float, float] = (0.2, 5.0),
                 min_compute_seconds: float = 0.005):
        self.window = window
        self.alpha = alpha
        self.bounds = bounds
        #: shorter denoising runs than this say more about event timing than about the device
        self.min_compute_seconds = min_compute_seconds
        self.errors: deque[tuple[float, float]] = deque(maxlen=window)  # (predicted, measured)
        self.total = 0
        self._log_speed = 0.0
        self.samples = 0

    @property
    def speed(self) -> float:
        return math.exp(self._log_speed)

    def record_finish(self, predicted: float, measured: float) -> None:
        if predicted > 0 and measured > 0:
            self.errors.append((predicted, measured))
            self.total += 1

    def record_compute(self, predicted: float, measured: float) -> None:
        """One edit's denoising: measured seconds vs the profile's seconds for the same steps (speed 1)."""
        if predicted <= 0 or measured < self.min_compute_seconds:
            return
        ratio = min(max(measured / predicted, self.bounds[0]), self.bounds[1])
        # The first samples count fully (nothing to average with yet), later ones by alpha.
        weight = max(self.alpha, 1.0 / (self.samples + 1))
        self._log_speed += weight * (math.log(ratio) - self._log_speed)
        self.samples += 1

    def reset(self) -> None:
        self.errors.clear()
        self.total = 0
        self._log_speed = 0.0
        self.samples = 0

    def summary(self) -> AccuracySummary:
        return summarise(list(self.errors), self.speed)


def summarise(pairs: list[tuple[float, float]], speed: float = 1.0) -> AccuracySummary:
    if not pairs:
        return AccuracySummary(0, 0.0, 0.0, 0.0, 0.0, speed)
    errors = [m - p for p, m in pairs]
    rel = sorted(abs(m - p) / m for p, m in pairs)
    p95 = rel[min(len(rel) - 1, math.ceil(0.95 * len(rel)) - 1)]
    return AccuracySummary(len(pairs), sum(errors) / len(errors), sum(abs(e) for e in errors) / len(errors),
                           sum(rel) / len(rel), p95, speed)
