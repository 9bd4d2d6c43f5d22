"""The scheduler's metrics: edits by status, queueing and inference latency, placements, prediction error, workers.

Labels stay low-cardinality: the model id (a handful per cluster), gRPC status names, cache tiers, worker
states. Template ids and request ids are never labels.
"""
from __future__ import annotations

from opentelemetry.metrics import CallbackOptions, Observation

from ..common.telemetry import meter


class SchedulerMetrics:
    def __init__(self, service):
        m = meter()
        self._service = service
        self.requests = m.create_counter(
            "instgenie_scheduler_requests", description="Edits the scheduler finished, by model and gRPC status")
        self.rejections = m.create_counter(
            "instgenie_scheduler_rejections", description="Requests refused at admission or placement, by reason")
        self.placements = m.create_counter(
            "instgenie_scheduler_placements",
            description="Edit placements by where the template's cache was on the chosen worker (host, loading, "
                        "store) and whether it was a re-placement after a worker failed")
        self.queue = m.create_histogram(
            "instgenie_request_queue_seconds", unit="s",
            description="Edits: admission by the scheduler until the worker ran their first step")
        self.inference = m.create_histogram(
            "instgenie_request_inference_seconds", unit="s",
            description="Edits: first step until the result reached the scheduler (denoising and decoding)")
        self.abs_error = m.create_histogram(
            "instgenie_scheduler_prediction_abs_error_seconds", unit="s",
            description="Placement-time finish prediction error: |actual - predicted| seconds")
        # OpenTelemetry histograms take no negative values: the sign goes to two counters (mean signed error =
        # (late - early) / count)
        self.late = m.create_counter("instgenie_scheduler_prediction_late", unit="s",
                                     description="Seconds edits finished after their prediction, summed")
        self.early = m.create_counter("instgenie_scheduler_prediction_early", unit="s",
                                      description="Seconds edits finished before their prediction, summed")
        self.relative_error = m.create_histogram(
            "instgenie_scheduler_prediction_relative_error",
            description="Placement-time finish prediction error: |actual - predicted| / predicted")
        m.create_observable_gauge("instgenie_scheduler_in_flight", [self._in_flight],
                                  description="Edits and registrations admitted and not answered")
        m.create_observable_gauge("instgenie_scheduler_queue_depth", [self._queue_depth],
                                  description="Placed edits waiting for a batch slot on their worker, by model")
        m.create_observable_gauge("instgenie_scheduler_running", [self._running],
                                  description="Placed edits running on their worker, by model")
        m.create_observable_gauge("instgenie_scheduler_workers", [self._workers],
                                  description="Registered workers by model and state (live, draining, unready: "
                                              "reported not ready by Kubernetes discovery)")

    # -------------------------------------------------------------------------------- callbacks
    def _in_flight(self, options: CallbackOptions):
        s = self._service
        return [Observation(len(s.flights.running()) + len(s.registrations))]

    def _tracked(self, started: bool):
        counts: dict[str, int] = {}
        for record in self._service.registry.workers.values():
            n = sum(1 for t in record.tracked.values() if t.started == started)
            counts[record.model_id] = counts.get(record.model_id, 0) + n
        return [Observation(n, {"model": model}) for model, n in sorted(counts.items())] or [Observation(0)]

    def _queue_depth(self, options: CallbackOptions):
        return self._tracked(False)

    def _running(self, options: CallbackOptions):
        return self._tracked(True)

    def _workers(self, options: CallbackOptions):
        s = self._service
        live = {w.worker_id for w in s.registry.live()}
        counts: dict[tuple[str, str], int] = {}
        for record in s.registry.workers.values():
            state = "live" if record.worker_id in live else "unready" if record.worker_id in s.registry.unready \
                else "draining"
            counts[(record.model_id, state)] = counts.get((record.model_id, state), 0) + 1
        return [Observation(n, {"model": model, "state": state}) for (model, state), n in sorted(counts.items())] \
            or [Observation(0, {"model": "", "state": "live"})]
