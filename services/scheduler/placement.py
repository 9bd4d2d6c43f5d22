"""Placement policies: which worker runs a new request. Pure Python, no gRPC, so a simulator can drive it.

The default, `PredictedFinish`, is the design card's: for every worker that serves the request's model and
has room, simulate its step-level batch (running requests leave as their steps run out, waiting ones join in
FCFS order, a step takes the *batch's* time from the cost model, not the sum of its requests' times) with the
new request appended, and pick the worker where the new request would finish first. The new request cannot
join before it is pre-processed and its template's first step shard is in that worker's host memory, nor take
its last step before the last shard is: nothing to wait for when resident, the rest of the object-store
transfer when loading, all of it when cold. Ties go to the worker holding the template (affinity), then to the
least loaded. Each worker is predicted with its own cost model (its device profile) scaled by its online speed
correction (predictions.py).

With a linear cost model (a step is a * FLOPs + c * requests + b, FLOPs from `cost.request_flops`, which folds
a profile's cached-key attention term d in) the prediction is exact and cheap: the
worker's batch without the new request is simulated once into a `Timeline` (kept on the view until the worker
changes), and adding a request of f FLOPs that joins at step j and runs S steps only lengthens each of those
steps by a * f + c (it cannot delay anyone: FCFS admitted everybody ahead of it before it could join), so it
finishes at T(j + S) + S * (a * f + c).

The other policies are the comparison points from the paper's evaluation: least requests, least masked
tokens in flight, round robin.
"""
from __future__ import annotations

import bisect
import heapq
import itertools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from .costmodel import AnalyticalCostModel, CostModel, ModelShape


@dataclass(frozen=True, slots=True)
class Work:
    """One request on a worker: masked tokens it computes per step (per guidance branch), steps left."""

    tokens: int
    steps_left: int
    #: FLOPs of one of its steps, every branch (0: the cost model counts them from tokens and mode)
    flops: float = 0.0
    mode: str = "kv"
    #: bytes of one step shard (moved host -> device every step on a streaming device)
    step_bytes: int = 0
    #: image tokens of its template (0: the model's default size), when flops are counted from tokens
    image_tokens: int = 0


@dataclass
class WorkerView:
    """What placement knows about one worker at this instant."""

    worker_id: str
    shape: ModelShape
    max_batch_size: int
    running: list[Work] = field(default_factory=list)
    waiting: list[Work] = field(default_factory=list)
    resident: frozenset[str] = frozenset()
    loading: frozenset[str] = frozenset()
    #: requests this worker may hold in all (running + waiting); placement skips a full worker
    capacity: int = 32
    #: this worker's cost model (its device profile); None: the policy's
    cost: CostModel | None = None
    #: measured / predicted compute time of this worker (online correction; > 1: slower than its profile)
    speed: float = 1.0
    #: a step of the running batch is under way, so a newcomer joins at the next step boundary at the earliest;
    #: `elapsed` seconds of it have run. The scheduler does not know step phases (False, 0); a simulator does.
    mid_step: bool = False
    elapsed: float = 0.0
    #: seconds until the worker's object-store link has loaded what it is loading now (a new load queues)
    link_backlog: float = 0.0
    _timelines: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def in_flight(self) -> int:
        return len(self.running) + len(self.waiting)

    @property
    def tokens_in_flight(self) -> int:
        return sum(w.tokens for w in itertools.chain(self.running, self.waiting))

    @property
    def has_room(self) -> bool:
        return self.in_flight < self.capacity

    def holds(self, template_id: str) -> bool:
        return template_id in self.resident

    def timeline(self, cost: CostModel) -> "Timeline":
        """The batch without a new request, from the start of the current step (or now when none is under way),
        simulated once per (cost model, speed): `elapsed` may move on, the composition may not."""
        key = (id(cost), self.speed)
        tl = self._timelines.get(key)
        if tl is None:
            tl = self._timelines[key] = Timeline.build(self, cost)
        return tl


@dataclass(frozen=True)
class PlacementRequest:
    model_id: str
    template_id: str
    tokens: int  # masked tokens per step per guidance branch
    steps: int
    cache_bytes: int = 0
    mode: str = "kv"
    #: image tokens of the template (its size; 0: the model's default), which its FLOPs are counted at
    image_tokens: int = 0


@dataclass(frozen=True)
class Choice:
    worker_id: str
    predicted_seconds: float


class PlacementPolicy(ABC):
    name = "abstract"

    @abstractmethod
    def choose(self, request: PlacementRequest, workers: list[WorkerView]) -> Choice | None:
        """The worker for `request` among `workers` (already filtered to its model), or None if none has room."""


def _flops(w: Work, shape: ModelShape, cost: CostModel) -> float:
    return w.flops or cost.request_flops(shape, w.tokens, w.mode, w.image_tokens)


def cache_gates(view: WorkerView, request: PlacementRequest, cost: CostModel) -> tuple[float, float]:
    """(earliest join, earliest last step): pre-processing and the first step shard; the last step shard.

    A cold template's load queues behind what the worker's link is loading already (`link_backlog`)."""
    pre = cost.pre_seconds
    if request.template_id in view.resident or request.cache_bytes <= 0:
        return pre, 0.0
    steps = max(1, request.steps)
    if request.template_id in view.loading:
        # Part of its shards are here already and the rest is on its way; we do not know how much: say half.
        first = cost.transfer_seconds(request.cache_bytes // steps, 1)
        return max(pre, first), cost.transfer_seconds(request.cache_bytes // 2, max(1, steps // 2))
    queue = view.link_backlog
    first = queue + cost.transfer_seconds(request.cache_bytes // steps, 1)
    return max(pre, first), queue + cost.transfer_seconds(request.cache_bytes, steps)


class Timeline:
    """A worker's batch without the new request, step by step, under a linear cost model.

    Segments of steps with the same batch: global step index where each starts, its start time (seconds from
    the start of the step under way, or from now), the duration of each of its steps, and how many requests
    run in it. After the last segment the worker is idle."""

    __slots__ = ("steps", "times", "durs", "counts", "end_step", "end_time", "a", "b", "c", "batch", "boundary")

    def __init__(self, a: float, b: float, c: float, batch: int, boundary: int):
        self.steps: list[int] = []
        self.times: list[float] = []
        self.durs: list[float] = []
        self.counts: list[int] = []
        self.end_step, self.end_time = 0, 0.0
        self.a, self.b, self.c, self.batch = a, b, c, batch
        #: first step boundary a newcomer may join at (1 when a step is under way)
        self.boundary = boundary

    @classmethod
    def build(cls, view: WorkerView, cost: CostModel) -> "Timeline":
        a, b, c = cost.linear
        speed = view.speed
        batch = max(1, view.max_batch_size)
        mid_step = view.mid_step and bool(view.running)
        tl = cls(a * speed, b * speed, c * speed, batch, 1 if mid_step else 0)
        leaves: list[tuple[int, float]] = []  # (global step after which it leaves, its flops)
        total = 0.0
        for w in view.running:
            if w.steps_left > 0:
                f = _flops(w, view.shape, cost)
                leaves.append((w.steps_left, f))
                total += f
        heapq.heapify(leaves)
        waiting = [(w.steps_left, _flops(w, view.shape, cost)) for w in view.waiting if w.steps_left > 0]
        waiting.reverse()  # pop() from the end = FCFS
        step, t = 0, 0.0
        while True:
            if step > 0 or not mid_step:
                while waiting and len(leaves) < batch:
                    sl, f = waiting.pop()
                    heapq.heappush(leaves, (step + sl, f))
                    total += f
            if not leaves:
                break
            dur = tl.a * total + tl.c * len(leaves) + tl.b
            nxt = leaves[0][0]
            if step == 0 and mid_step and waiting and len(leaves) < batch:
                nxt = 1  # the step under way ends; waiting requests join at its boundary
            tl.steps.append(step)
            tl.times.append(t)
            tl.durs.append(dur)
            tl.counts.append(len(leaves))
            t += (nxt - step) * dur
            step = nxt
            while leaves and leaves[0][0] == step:
                total -= heapq.heappop(leaves)[1]
        tl.end_step, tl.end_time = step, t
        return tl

    def time_at(self, step: int) -> float:
        """Seconds from now until global step `step` starts (the worker idles after the last segment)."""
        if step >= self.end_step:
            return self.end_time + (step - self.end_step) * self.b
        i = bisect.bisect_right(self.steps, step) - 1
        return self.times[i] + (step - self.steps[i]) * self.durs[i]

    def finish(self, flops: float, steps: int, gate: float) -> float:
        """When a request of `flops` per step and `steps` steps finishes, joining at the first step boundary
        at or after `gate` where the batch has room."""
        extra = self.a * flops + self.c
        n = len(self.steps)
        for i in range(n):
            if self.counts[i] >= self.batch:
                continue
            s0, t0, d = self.steps[i], self.times[i], self.durs[i]
            j = s0 if gate <= t0 else s0 + math.ceil((gate - t0) / d - 1e-12)
            j = max(j, self.boundary)
            if j < (self.steps[i + 1] if i + 1 < n else self.end_step):
                return self.time_at(j + steps) + steps * extra
        # Full until it runs dry: join once idle (and the gate has passed).
        start = max(self.end_time, gate)
        return start + steps * (self.b + extra)


def simulate_finish(view: WorkerView, request: PlacementRequest, cost: CostModel) -> float:
    """The new request's finish by stepping through the batch: any cost model (e.g. max(compute, transfer))."""
    start_gate, end_gate = cache_gates(view, request, cost)
    speed = view.speed
    streams = cost.streams_to_device
    my_bytes = request.cache_bytes // max(1, request.steps) if streams else 0
    # [flops, steps left, step bytes]
    running = [[_flops(w, view.shape, cost), w.steps_left, w.step_bytes] for w in view.running if w.steps_left > 0]
    waiting = [[_flops(w, view.shape, cost), w.steps_left, w.step_bytes] for w in view.waiting if w.steps_left > 0]
    mine = [cost.request_flops(view.shape, max(1, request.tokens), request.mode, request.image_tokens),
            max(1, request.steps), my_bytes]
    waiting.append(mine)
    batch_size = max(1, view.max_batch_size)
    mid_step = view.mid_step and bool(running)
    t = -view.elapsed if mid_step else 0.0
    first = True
    last_step = 0.0
    while True:
        # Admit FCFS while there is room (not during a step under way); the new request only once ready.
        under_way = first and mid_step
        if not under_way:
            while waiting and len(running) < batch_size:
                if waiting[0] is mine and t < start_gate:
                    break
                running.append(waiting.pop(0))
        first = False
        if not running:  # only the new request is left and it is not ready yet
            t = start_gate
            continue
        step = cost.step_time(sum(r[0] for r in running), len(running),
                              sum(r[2] for r in running) if streams else 0) * speed
        steps = min(r[1] for r in running)
        if under_way and waiting and len(running) < batch_size:
            steps = 1  # the step under way ends; waiting requests join at its boundary
        elif waiting and waiting[0] is mine and t < start_gate and len(running) < batch_size:
            steps = max(1, min(steps, math.ceil((start_gate - t) / step - 1e-12)))
        t += steps * step
        last_step = step
        for r in running:
            r[1] -= steps
        if mine[1] <= 0:
            return max(t, end_gate + last_step)
        running = [r for r in running if r[1] > 0]


def predict_finish(view: WorkerView, request: PlacementRequest, cost: CostModel | None = None) -> float:
    """Seconds until `request` would be answered by `view`'s worker: denoising under step-level continuous
    batching, then post-processing."""
    cost = view.cost or cost or _DEFAULT_COST
    if cost.linear is None:
        return simulate_finish(view, request, cost) + cost.post_seconds
    start_gate, end_gate = cache_gates(view, request, cost)
    tl = view.timeline(cost)
    # The timeline counts from the start of the step under way: shift the gates in, the answer out.
    shift = view.elapsed if tl.boundary else 0.0
    flops = cost.request_flops(view.shape, max(1, request.tokens), request.mode, request.image_tokens)
    steps = max(1, request.steps)
    finish = tl.finish(flops, steps, start_gate + shift) - shift
    if end_gate > 0:
        finish = max(finish, end_gate + tl.b + tl.c + tl.a * flops)
    return finish + cost.post_seconds


_DEFAULT_COST = AnalyticalCostModel()


class PredictedFinish(PlacementPolicy):
    """Minimum predicted finish; a worker holding the template wins ties, and near-ties within
    `affinity_slack` (a fraction of the best prediction): keeping a template where it is saves the object
    store a transfer and another worker's host memory an eviction, which no single prediction sees."""

    name = "predicted-finish"

    def __init__(self, cost: CostModel | None = None, affinity_slack: float = 0.0):
        self.cost = cost or AnalyticalCostModel()
        self.affinity_slack = affinity_slack

    def choose(self, request: PlacementRequest, workers: list[WorkerView]) -> Choice | None:
        best, best_key, holder, holder_key = None, None, None, None
        for view in workers:
            if not view.has_room:
                continue
            finish = predict_finish(view, request, self.cost)
            away = request.template_id not in view.resident
            # Round to a microsecond so that equal predictions tie and affinity decides.
            key = (round(finish, 6), away, view.in_flight, view.worker_id)
            if best_key is None or key < best_key:
                best, best_key = Choice(view.worker_id, finish), key
            if not away and (holder_key is None or key < holder_key):
                holder, holder_key = Choice(view.worker_id, finish), key
        if best is not None and holder is not None and holder is not best \
                and holder.predicted_seconds <= best.predicted_seconds * (1.0 + self.affinity_slack):
            return holder
        return best


class LeastRequests(PlacementPolicy):
    name = "least-requests"

    def choose(self, request, workers):
        room = [w for w in workers if w.has_room]
        if not room:
            return None
        w = min(room, key=lambda v: (v.in_flight, request.template_id not in v.resident, v.worker_id))
        return Choice(w.worker_id, 0.0)


class LeastMaskedTokens(PlacementPolicy):
    name = "least-masked-tokens"

    def choose(self, request, workers):
        room = [w for w in workers if w.has_room]
        if not room:
            return None
        w = min(room, key=lambda v: (v.tokens_in_flight, request.template_id not in v.resident, v.worker_id))
        return Choice(w.worker_id, 0.0)


class RoundRobin(PlacementPolicy):
    name = "round-robin"

    def __init__(self):
        self._next = 0

    def choose(self, request, workers):
        room = sorted((w for w in workers if w.has_room), key=lambda v: v.worker_id)
        if not room:
            return None
        w = room[self._next % len(room)]
        self._next += 1
        return Choice(w.worker_id, 0.0)


POLICIES = {cls.name: cls for cls in (PredictedFinish, LeastRequests, LeastMaskedTokens, RoundRobin)}


def make_policy(name: str, cost: CostModel | None = None, affinity_slack: float = 0.0) -> PlacementPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown placement policy {name!r}; choose one of {sorted(POLICIES)}")
    return PredictedFinish(cost, affinity_slack) if name == PredictedFinish.name else POLICIES[name]()
