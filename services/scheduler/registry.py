"""The worker registry: who serves what, their load, and what the scheduler itself has placed on them.

Workers register once their model is loaded and then push a load report every `report_interval` (also the
heartbeat); a worker silent for `lease` is retired, and so is one whose stream broke at the transport level
(it registers again on its next report, which answers NOT_FOUND). Kubernetes discovery, where it runs, marks
workers whose pods are not ready (terminating, evicted, failing) in `unready`: they get no new work, while what
runs there goes on; a pod ready again (or a new pod of that name) is cleared.

Load for placement comes from two sources: the requests the scheduler placed there and still tracks (exact
and current: the scheduler forwards every step event), and the worker's last report (resident templates,
draining, work the scheduler did not place, e.g. after a scheduler restart). A worker whose last report is
older than the lease is never placed on, even before the expiry sweep retires it.

Each worker is predicted with its own cost model: the profile it announces (`WorkerInfo.profile`), else a
loaded profile of its model and device kind, else the policy's default; and with its own accuracy record
(predictions.py), whose speed correction scales its step times. Views are cached per worker and rebuilt
only when something placement reads has changed (a report, a tracked request placed, started, stepped or
answered).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from .costmodel import CostModel, FittedCostModel, ModelShape, cap_store_reads
from .placement import Work, WorkerView
from .predictions import WorkerAccuracy
from .profile import Profile

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
    #: FLOPs of one of its steps, every branch (0: counted from tokens by the cost model)
    flops: float = 0.0
    mode: str = "kv"
    placed_at: float = 0.0
    #: bytes of its template's cache (the transfer it may need)
    cache_bytes: int = 0
    #: what the gateway was told (seconds from placement to the answer); 0: no prediction
    predicted: float = 0.0
    #: where its template was on this worker when placed: "host", "loading" or "store"
    tier: str = ""
    started_at: float | None = None
    last_step_at: float = 0.0
    #: the cost model's seconds (speed 1) for the steps it ran, in the batches the scheduler saw it in
    profiled_compute: float = 0.0
    #: its worker was loading a template while it ran: a step may have waited for a shard, so its timing
    #: says nothing about the device
    overlapped_load: bool = False
    #: image tokens of its template (0: the model's default size), which its FLOPs are counted at
    image_tokens: int = 0


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
    #: this worker's cost model (None: the policy's) and how it was chosen
    cost: CostModel | None = None
    cost_source: str = "policy default"
    accuracy: WorkerAccuracy = field(default_factory=WorkerAccuracy)
    #: bumped whenever something a view reads changes
    version: int = 0
    _view: tuple | None = None

    def touch(self) -> None:
        self.version += 1

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
                 clock: Callable[[], float] = time.monotonic, profiles: list[Profile] = (),
                 correction: bool = True):
        self.lease = lease
        #: a worker holds at most max_batch_size * capacity_per_slot requests (running + waiting)
        self.capacity_per_slot = capacity_per_slot
        self.connect = connect  # address -> (channel, stub); None in pure tests
        self.clock = clock
        self.workers: dict[str, WorkerRecord] = {}
        self.profiles = {p.profile_id: FittedCostModel(p) for p in profiles}
        self._capped: dict[tuple[str, float], CostModel] = {}
        #: scale each worker's step times by its measured speed (predictions.py)
        self.correction = correction
        #: for workers without a profile of their own (the placement policy's)
        self.default_cost: CostModel | None = None
        #: worker ids Kubernetes discovery reports as not ready (terminating, evicted, failing): never placed on
        self.unready: set[str] = set()

    # ----------------------------------------------------------------------------------- cost models
    def cost_for(self, info) -> tuple[CostModel | None, str]:
        """The cost model of a worker: the profile it announces, else one of its model and device kind; priced
        at the worker's object-store read cap when it announces one."""
        cost, source = self._profile_for(info)
        cap = info.store_read_bytes_per_second
        if cost is None or not cap > 0:
            return cost, source
        key = (cost.name, cap)
        if key not in self._capped:  # one object per (profile, cap): a re-registration keeps what was learnt
            self._capped[key] = cap_store_reads(cost, cap)
        capped = self._capped[key]
        return capped, source if capped is cost else f"{source}, store reads capped at {cap / 1e6:g} MB/s"

    def _profile_for(self, info) -> tuple[CostModel | None, str]:
        announced = info.profile
        if announced and announced in self.profiles:
            return self.profiles[announced], f"profile {announced} (announced)"
        device = info.device.split(":")[0] if info.device else ""
        same = [c for c in self.profiles.values() if c.profile.model_id == info.model.model_id
                and (not device or c.profile.device_kind.split(":")[0] == device)]
        if announced:
            log.warning("worker %s announces profile %s, which this scheduler was not given (%s)", info.worker_id,
                        announced, f"using {same[0].name}" if same else "using the default cost model")
        if same:
            return same[0], f"profile {same[0].name} (model and device kind)"
        return None, "policy default"

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
        cost, source = self.cost_for(info)
        record = WorkerRecord(info=info, load=load, shape=ModelShape.from_proto(info.model), last_report=now,
                              registered_at=now, channel=channel, stub=stub, tracked=tracked, cost=cost,
                              cost_source=source)
        if old is not None and old.cost is cost:
            record.accuracy = old.accuracy  # the same device and profile: what was learnt still holds
        self.workers[info.worker_id] = record
        log.info("worker %s registered at %s serving %s", info.worker_id, info.address, info.model.model_id)
        return record, stale

    def report(self, worker_id: str, load) -> WorkerRecord:
        record = self.workers.get(worker_id)
        if record is None:
            raise KeyError(worker_id)
        record.load = load
        record.last_report = self.clock()
        record.touch()
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
        """Workers that may be placed on: reporting within the lease, not draining, serving `model_id`."""
        now = self.clock()
        return [w for w in self.workers.values()
                if not w.draining and now - w.last_report <= self.lease and w.worker_id not in self.unready
                and (model_id is None or w.model_id == model_id)]

    # -------------------------------------------------------------------------------- tracked work
    def track(self, worker_id: str, item: Tracked) -> None:
        record = self.workers.get(worker_id)
        if record is not None:
            record.tracked[item.request_id] = item
            record.touch()

    def untrack(self, worker_id: str, request_id: str) -> None:
        record = self.workers.get(worker_id)
        if record is not None:
            record.tracked.pop(request_id, None)
            record.touch()

    def started(self, record: WorkerRecord, item: Tracked, now: float) -> None:
        """The worker admitted `item` to its running batch."""
        if not item.started or item.started_at is None:
            item.started, item.started_at, item.last_step_at = True, now, now
            record.touch()

    def stepped(self, record: WorkerRecord, item: Tracked, step: int, now: float, total: int = 0) -> None:
        """`item` has run `step` of `total` steps (progress events may skip some). Accounts the profile's seconds
        for the steps since the last event, in the batch running now; at the last step, compares them with the
        measured denoising time and updates the worker's speed correction."""
        if total > 0:
            item.total_steps = total  # the worker's count is the truth
        if item.started_at is None:
            self.started(record, item, now)
        advanced = step - item.steps_done
        if advanced > 0:
            cost = record.cost or self.default_cost
            if cost is not None:
                flops, n = self._running_flops(record, cost)
                item.profiled_compute += advanced * cost.step_time(flops, max(1, n))
            if record.load.loading_templates:
                item.overlapped_load = True
            item.steps_done, item.last_step_at = step, now
            record.touch()
            if step >= item.total_steps and not item.overlapped_load and self.correction:
                record.accuracy.record_compute(item.profiled_compute, now - item.started_at)

    def answered(self, record: WorkerRecord, item: Tracked, now: float) -> None:
        """The result of `item` passed through: record the finish error of its placement-time prediction."""
        record.accuracy.record_finish(item.predicted, now - item.placed_at)

    def _link_backlog(self, record: WorkerRecord, resident: frozenset, loading: frozenset) -> float:
        """Seconds of object-store transfer the worker still has queued: every template it is loading (per its
        report, or placed here cold since), half of it left on average. The worker's host tier loads templates
        one after another, so a new cold template waits behind these."""
        cost = record.cost or self.default_cost
        if cost is None:
            return 0.0
        sizes: dict[str, tuple[int, int]] = {}
        for t in record.tracked.values():
            if t.tier in ("store", "loading") and t.template_id not in resident and t.cache_bytes > 0:
                sizes[t.template_id] = (t.cache_bytes, t.total_steps)
        typical = max(sizes.values(), default=(0, 1))
        for tid in loading:
            sizes.setdefault(tid, typical)
        return sum(cost.transfer_seconds(b, steps) for b, steps in sizes.values() if b > 0) / 2

    @staticmethod
    def _running_flops(record: WorkerRecord, cost: CostModel) -> tuple[float, int]:
        flops, n = 0.0, 0
        for t in record.tracked.values():
            if t.started:
                flops += t.flops or cost.request_flops(record.shape, t.tokens, t.mode, t.image_tokens)
                n += 1
        branches = max(1, record.shape.branches)
        for r in record.load.running:
            if r.request_id not in record.tracked:
                flops += cost.request_flops(record.shape, int(r.tokens) // branches)
                n += 1
        return flops, n

    # ------------------------------------------------------------------------------------ placement
    def view(self, record: WorkerRecord) -> WorkerView:
        speed = record.accuracy.speed if self.correction else 1.0
        cached = record._view
        if cached is not None and cached[0] == record.version and cached[1].speed == speed:
            return cached[1]
        running, waiting = [], []
        for t in record.tracked.values():
            work = Work(t.tokens, max(0, t.total_steps - t.steps_done), t.flops, t.mode,
                        image_tokens=t.image_tokens)
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
        resident = frozenset(record.load.resident_templates)
        loading = frozenset(record.load.loading_templates)
        view = WorkerView(
            worker_id=record.worker_id, shape=record.shape, max_batch_size=max_batch, running=running,
            waiting=waiting, resident=resident, loading=loading, capacity=max_batch * self.capacity_per_slot,
            cost=record.cost, speed=speed, link_backlog=self._link_backlog(record, resident, loading),
        )
        record._view = (record.version, view)
        return view

    def views(self, model_id: str, exclude: set[str] = frozenset()) -> list[WorkerView]:
        return [self.view(w) for w in self.live(model_id) if w.worker_id not in exclude]
