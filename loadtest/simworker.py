"""Simulated workers for the placement simulator: the engine loop's step-level batching, a host-memory tier with
an LRU of templates, and an object-store link, with step and transfer times from a device profile.

What a simulated worker does is what the real one does (engine/serving/, engine/cache_provider.py):
* a placed request starts pre-processing at once (`pre_seconds`) while its template's cache starts loading;
  then it waits in FCFS order and joins the running batch at a step boundary when there is room;
* a step takes the batch's time, `a * FLOPs + c * requests + b` of the profile (FLOPs as the cost model's
  `request_flops` counts them, the d term folded in) times the worker's true
  speed (1 = as profiled); it cannot start before every member's step shard for that step is in host memory
  (the real engine blocks the whole batch on a missing shard the same way);
* the link loads one template at a time, shard after shard, at `store_to_host`'s bandwidth plus its
  per-object latency; host memory holds `host_templates` templates, least recently used evicted first,
  never one a request in flight still needs;
* a finished request is post-processed (`post_seconds`) before its answer leaves the worker.
The scheduler side sees each worker as a `WorkerView`, rebuilt only when the worker changes.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from instgenie.services.scheduler.costmodel import FittedCostModel, ModelShape
from instgenie.services.scheduler.placement import Work, WorkerView


@dataclass
class SimRequest:
    index: int
    arrival: float
    template: str
    tokens: int
    steps: int
    flops: float
    cache_bytes: int
    worker: "SimWorker | None" = None
    placed_at: float = 0.0
    predicted: float = 0.0
    tier: str = ""  # "host", "loading" or "store" at placement
    steps_done: int = 0
    first_step: float | None = None
    last_step_end: float = 0.0
    #: the profile's compute seconds for the steps it ran, in the batches it ran in (speed 1)
    profiled_compute: float = 0.0
    #: its worker's link was loading during one of its steps: the step may have waited for a shard, so its
    #: timing says nothing about the device (the scheduler sees this as a loading template in the report)
    overlapped_load: bool = False
    finished: float | None = None
    attempts: int = 0
    #: its template's image tokens (0: the model's default size)
    image_tokens: int = 0


@dataclass
class Loaded:
    """A template in host memory: when each of its step shards arrived (or will)."""

    shards: list[float]
    nbytes: int

    @property
    def done_at(self) -> float:
        return self.shards[-1]


@dataclass
class SimWorker:
    worker_id: str
    shape: ModelShape
    max_batch: int
    device: FittedCostModel  # the true times (a profile; `speed` scales its compute)
    speed: float
    host_templates: int
    capacity: int
    sim: object  # the Simulation: schedule(time, fn, *args), now
    running: list[SimRequest] = field(default_factory=list)
    waiting: deque = field(default_factory=deque)
    preparing: list[SimRequest] = field(default_factory=list)
    host: OrderedDict = field(default_factory=OrderedDict)  # template -> Loaded
    pins: dict = field(default_factory=dict)  # template -> requests in flight needing it
    link_free_at: float = 0.0
    stepping: bool = False
    step_start: float = 0.0
    bytes_loaded: int = 0
    loads: int = 0
    steps_run: int = 0
    _view: WorkerView | None = None

    # ------------------------------------------------------------------------------------------- host tier
    def tier(self, template: str, now: float) -> str:
        loaded = self.host.get(template)
        if loaded is None:
            return "store"
        return "host" if loaded.done_at <= now else "loading"

    def ensure(self, template: str, nbytes: int, steps: int, now: float) -> bool:
        """Bring a template into host memory (LRU touch if there); True if a transfer started."""
        loaded = self.host.get(template)
        if loaded is not None:
            self.host.move_to_end(template)
            return False
        self._evict(now)
        start = max(now, self.link_free_at)
        store = self.device.store
        per = nbytes / max(1, steps)
        shards = [start + (k + 1) * (per / store.bandwidth + store.latency) for k in range(steps)]
        self.host[template] = Loaded(shards, nbytes)
        self.link_free_at = shards[-1]
        self.bytes_loaded += nbytes
        self.loads += 1
        self.sim.schedule(shards[-1], self._landed)
        self.dirty()
        return True

    def preload(self, template: str, nbytes: int, steps: int) -> None:
        """A template already resident when the simulation starts (no transfer counted)."""
        self.host[template] = Loaded([float("-inf")] * max(1, steps), nbytes)
        self.dirty()

    def _evict(self, now: float) -> None:
        while len(self.host) >= self.host_templates:
            victim = next((t for t in self.host if not self.pins.get(t) and self.host[t].done_at <= now), None)
            if victim is None:
                return  # everything is in use or still arriving: over budget until something frees
            del self.host[victim]

    def _landed(self, now: float) -> None:
        self.dirty()

    # ---------------------------------------------------------------------------------------------- requests
    def submit(self, req: SimRequest, now: float) -> None:
        req.worker, req.placed_at = self, now
        req.tier = self.tier(req.template, now)
        self.pins[req.template] = self.pins.get(req.template, 0) + 1
        self.ensure(req.template, req.cache_bytes, req.steps, now)
        self.preparing.append(req)
        self.sim.schedule(now + self.device.pre_seconds, self._prepared, req)
        self.dirty()

    def _prepared(self, now: float, req: SimRequest) -> None:
        self.preparing.remove(req)
        self.waiting.append(req)
        self.dirty()
        if not self.stepping:
            self._start_step(now)

    def _start_step(self, now: float) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            self.running.append(self.waiting.popleft())
        if not self.running:
            self.stepping = False
            self.dirty()
            return
        # The step waits for every member's shard of the step it is about to run.
        ready = max(self.host[r.template].shards[r.steps_done] for r in self.running)
        start = max(now, ready)
        flops = sum(r.flops for r in self.running)
        n = len(self.running)
        profiled = self.device.step_time(flops, n)
        loading = self.link_free_at > now
        for r in self.running:
            if r.first_step is None:
                r.first_step = start
            r.profiled_compute += profiled
            r.overlapped_load |= loading
        self.stepping, self.step_start = True, start
        self.sim.schedule(start + profiled * self.speed, self._step_end, list(self.running))
        self.dirty()

    def _step_end(self, now: float, batch: list[SimRequest]) -> None:
        self.steps_run += 1
        for r in batch:
            r.steps_done += 1
            r.last_step_end = now
            self.host.move_to_end(r.template)
            if r.steps_done >= r.steps:
                self.running.remove(r)
                self.sim.schedule(now + self.device.post_seconds, self._answered, r)
        self._start_step(now)

    def _answered(self, now: float, req: SimRequest) -> None:
        req.finished = now
        left = self.pins[req.template] - 1
        if left:
            self.pins[req.template] = left
        else:
            del self.pins[req.template]
        self.sim.finished(req)

    # ------------------------------------------------------------------------------------------------ view
    @property
    def in_flight(self) -> int:
        return len(self.running) + len(self.waiting) + len(self.preparing)

    def dirty(self) -> None:
        self._view = None

    def view(self, now: float, cost, speed: float) -> WorkerView:
        """What the scheduler sees: tracked requests (running / waiting, pre-processing counted as waiting),
        resident and loading templates; kept until the worker changes (only the step phase moves on)."""
        v = self._view
        if v is None or v.speed != speed:
            resident = frozenset(t for t, ld in self.host.items() if ld.done_at <= now)
            loading = frozenset(t for t, ld in self.host.items() if ld.done_at > now)
            v = self._view = WorkerView(
                self.worker_id, self.shape, self.max_batch,
                [Work(r.tokens, r.steps - r.steps_done, r.flops, image_tokens=r.image_tokens) for r in self.running],
                [Work(r.tokens, r.steps, r.flops, image_tokens=r.image_tokens)
                 for r in (*self.waiting, *self.preparing)],
                resident, loading, self.capacity, cost, speed, mid_step=self.stepping and bool(self.running))
        v.elapsed = now - self.step_start if v.mid_step else 0.0
        v.link_backlog = max(0.0, self.link_free_at - now)
        return v
