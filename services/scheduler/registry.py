"""The worker registry: who serves what, their load, and what the scheduler itself has placed on them.

Workers register once their model is loaded and then push a load report every `report_interval` (also the
heartbeat); a worker silent for `lease` is retired, and so is one whose stream broke at the transport level
(it registers again on its next report, which answers NOT_FOUND). Kubernetes discovery, where it runs, only
adds and retires members through the same calls.

Load for placement comes from two sources: the requests the scheduler placed there and still tracks (exact
and current: the scheduler forwards every step event), and the worker's last report (resident templates,
draining, work the scheduler did not place, e.g. after a scheduler restart).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from .costmodel import ModelShape
from .placement import Work, WorkerView

log = logging.getLogger(__name__)


@dataclass
class Tracked:
    """A request the scheduler placed on a worker and has not seen answered."""

    request_id: str
    template_id: str
    tokens: int  # masked tokens per step, per guidance branch
    total_steps: int
    steps_done: int = 0
    started: bool = False


@dataclass
class WorkerRecord:
    info: object  # scheduler.v1.WorkerInfo
    load: object  # worker.v1.WorkerLoad
    shape: ModelShape
    last_report: float
    registered_at: float
    channel: object = None
    stub: object = None
    tracked: dict[str, Tracked] = field(default_factory=dict)

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def model_id(self) -> str:
        return self.info.model.model_id

    @property
    def draining(self) -> bool:
        return bool(self.load.draining)


class Registry:
    """Thread-compatible, used from the scheduler's event loop only."""

    def __init__(self, *, lease: float = 6.0, capacity_per_slot: int = 4,
                 connect: Callable[[str], tuple[object, object]] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.lease = lease
        #: a worker holds at most max_batch_size * capacity_per_slot requests (running + waiting)
        self.capacity_per_slot = capacity_per_slot
        self.connect = connect  # address -> (channel, stub); None in pure tests
        self.clock = clock
        self.workers: dict[str, WorkerRecord] = {}

    # ------------------------------------------------------------------------------------ membership
    def register(self, info, load) -> tuple[WorkerRecord, list[object]]:
        """Add or replace a worker; returns the record and channels that should be closed."""
        now = self.clock()
        old = self.workers.get(info.worker_id)
        stale = []
        if old is not None and old.info.address == info.address and old.channel is not None:
            channel, stub = old.channel, old.stub
            tracked = old.tracked
        else:
            if old is not None and old.channel is not None:
                stale.append(old.channel)
            channel, stub = self.connect(info.address) if self.connect else (None, None)
            tracked = old.tracked if old is not None else {}
        record = WorkerRecord(info=info, load=load, shape=ModelShape.from_proto(info.model), last_report=now,
                              registered_at=now, channel=channel, stub=stub, tracked=tracked)
        self.workers[info.worker_id] = record
        log.info("worker %s registered at %s serving %s", info.worker_id, info.address, info.model.model_id)
        return record, stale

    def report(self, worker_id: str, load) -> WorkerRecord:
        record = self.workers.get(worker_id)
        if record is None:
            raise KeyError(worker_id)
        record.load = load
        record.last_report = self.clock()
        return record

    def retire(self, worker_id: str, reason: str) -> WorkerRecord | None:
        record = self.workers.pop(worker_id, None)
        if record is not None:
            log.warning("worker %s retired: %s", worker_id, reason)
        return record

    def expire(self) -> list[WorkerRecord]:
        """Retire workers whose last report is older than the lease."""
        now = self.clock()
        gone = [w for w in self.workers.values() if now - w.last_report > self.lease]
        for w in gone:
            self.retire(w.worker_id, f"no load report for {now - w.last_report:.1f}s (lease {self.lease:.1f}s)")
        return gone

    def get(self, worker_id: str) -> WorkerRecord | None:
        return self.workers.get(worker_id)

    def live(self, model_id: str | None = None) -> list[WorkerRecord]:
        return [w for w in self.workers.values()
                if not w.draining and (model_id is None or w.model_id == model_id)]

    # -------------------------------------------------------------------------------- tracked work
    def track(self, worker_id: str, item: Tracked) -> None:
        record = self.workers.get(worker_id)
        if record is not None:
            record.tracked[item.request_id] = item

    def untrack(self, worker_id: str, request_id: str) -> None:
        record = self.workers.get(worker_id)
        if record is not None:
            record.tracked.pop(request_id, None)

    # ------------------------------------------------------------------------------------ placement
    def view(self, record: WorkerRecord) -> WorkerView:
        running, waiting = [], []
        for t in record.tracked.values():
            work = Work(t.tokens, max(0, t.total_steps - t.steps_done))
            (running if t.started else waiting).append(work)
        # Work the worker reports but this scheduler did not place (e.g. placed before a restart).
        branches = max(1, record.shape.branches)
        for r in record.load.running:
            if r.request_id not in record.tracked:
                running.append(Work(int(r.tokens) // branches, max(0, r.total_steps - r.steps_done)))
        for r in record.load.waiting:
            if r.request_id not in record.tracked:
                waiting.append(Work(int(r.tokens) // branches, max(0, r.total_steps - r.steps_done)))
        max_batch = max(1, record.info.max_batch_size)
        return WorkerView(
            worker_id=record.worker_id, shape=record.shape, max_batch_size=max_batch, running=running,
            waiting=waiting, resident=frozenset(record.load.resident_templates),
            loading=frozenset(record.load.loading_templates), capacity=max_batch * self.capacity_per_slot,
        )

    def views(self, model_id: str, exclude: set[str] = frozenset()) -> list[WorkerView]:
        return [self.view(w) for w in self.live(model_id) if w.worker_id not in exclude]
