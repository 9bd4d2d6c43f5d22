"""The worker's metrics: per-step batch size, tokens and time; running and waiting requests; cache tiers and bytes.

Step metrics are taken around the engine loop's batch step (`EngineLoop._step`, on the engine's thread: one
histogram record each, no lock of ours); load and cache gauges are read from the loop's snapshot and the host
cache's counters only when Prometheus scrapes. Load/compute overlap comes from the engine's block-loader
reports, which exist only when the editor streams caches block by block (a `PipelineConfig`, as on GPU
workers); a worker without one exports no overlap samples.
"""
from __future__ import annotations

import logging
import time

from opentelemetry.metrics import CallbackOptions, Observation

from ..common.telemetry import meter

log = logging.getLogger(__name__)


class WorkerMetrics:
    def __init__(self, runtime):
        self.runtime = runtime
        self.model = ""
        m = meter()
        self.edits = m.create_counter(
            "instgenie_worker_edits",
            description="Edits this worker answered, by model, the tier its template's cache came from (host: "
                        "already in host memory; store: loaded from the object store) and gRPC status")
        self.queue = m.create_histogram("instgenie_worker_queue_seconds", unit="s",
                                        description="Edits: arrival at the worker until their first step")
        self.batch = m.create_histogram("instgenie_worker_batch_size",
                                        description="Requests in each denoising step's batch")
        self.tokens = m.create_histogram("instgenie_worker_step_tokens",
                                         description="Image tokens computed in each denoising step (masked tokens "
                                                     "over every request and guidance branch of the batch)")
        self.step = m.create_histogram("instgenie_worker_step_seconds", unit="s",
                                       description="Wall time of each batched denoising step")
        self.overlap = m.create_histogram(
            "instgenie_worker_load_overlap_ratio",
            description="Share of a step's cache load time hidden behind compute (block-streamed caches only)")
        m.create_observable_gauge("instgenie_worker_requests", [self._requests],
                                  description="Requests on this worker by phase: running (in the batch), waiting "
                                              "(for a batch slot), preparing, finishing")
        m.create_observable_gauge("instgenie_worker_max_batch_size", [self._max_batch],
                                  description="Batch slots of this worker")
        m.create_observable_counter(
            "instgenie_worker_host_cache_lookups", [self._lookups],
            description="Step-shard lookups in the host-memory cache tier, by result (hit, miss)")
        m.create_observable_counter("instgenie_worker_cache_loaded", [self._loaded], unit="By",
                                    description="Bytes loaded from the object store into the host-memory tier")
        m.create_observable_gauge("instgenie_worker_host_cache", [self._host_bytes], unit="By",
                                  description="Bytes held in the host-memory cache tier, and its budget")
        self._last_report = None

    @property
    def labels(self) -> dict:
        return {"model": self.model}

    def install(self) -> None:
        """Once the engine loop runs: time its batch steps."""
        loop = self.runtime.loop
        self.model = self.runtime.editor.model.info.model_id
        step = loop._step
        labels = self.labels
        pipeline = getattr(self.runtime.editor, "pipeline", None)

        def timed_step(states, use_cache):
            t0 = time.perf_counter()
            failed = step(states, use_cache)
            self.step.record(time.perf_counter() - t0, labels)
            self.batch.record(len(states), labels)
            self.tokens.record(sum(int(s.mask.index.numel()) * s.branches for s in states), labels)
            if pipeline is not None:
                self._observe_overlap(pipeline, labels)
            return failed

        loop._step = timed_step

    def _observe_overlap(self, pipeline, labels) -> None:
        """The loader report the step just kept (one per block-streamed step; none for a dense step)."""
        last = pipeline.reports[-1] if pipeline.reports else None
        if last is not None and last is not self._last_report:
            self._last_report = last
            if last.total_load_s > 0:
                self.overlap.record(last.overlap_ratio, labels)

    # ------------------------------------------------------------------------------------- callbacks
    def _requests(self, options: CallbackOptions):
        loop = self.runtime.loop
        if loop is None:
            return []
        snap = loop.snapshot()
        return [Observation(len(snap.running), {**self.labels, "phase": "running"}),
                Observation(len(snap.waiting), {**self.labels, "phase": "waiting"}),
                Observation(snap.preparing, {**self.labels, "phase": "preparing"}),
                Observation(snap.finishing, {**self.labels, "phase": "finishing"})]

    def _max_batch(self, options: CallbackOptions):
        return [Observation(self.runtime.config.max_batch_size, self.labels)] if self.model else []

    def _lookups(self, options: CallbackOptions):
        host = self.runtime.host
        if host is None:
            return []
        stats = host.stats()
        return [Observation(stats.hits, {"tier": "host", "result": "hit"}),
                Observation(stats.misses, {"tier": "host", "result": "miss"})]

    def _loaded(self, options: CallbackOptions):
        host = self.runtime.host
        return [] if host is None else [Observation(host.stats().bytes_loaded, {"tier": "host"})]

    def _host_bytes(self, options: CallbackOptions):
        host = self.runtime.host
        if host is None:
            return []
        stats = host.stats()
        return [Observation(stats.bytes, {"kind": "held"}), Observation(stats.budget_bytes, {"kind": "budget"})]
