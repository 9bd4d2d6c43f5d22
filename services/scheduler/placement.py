"""Placement policies: which worker runs a new request. Pure Python, no gRPC, so a simulator can drive it.

The default, `PredictedFinish`, is the design card's: for every worker that serves the request's model and
has room, simulate its step-level batch (running requests leave as their steps run out, waiting ones join in
FCFS order, a step takes the *batch's* time from the cost model, not the sum of its requests' times) with the
new request appended, and pick the worker where the new request would finish first. The new request cannot
start before its template's cache is in that worker's host memory: zero when resident, the object-store
transfer otherwise. Ties go to the worker holding the template (affinity), then to the least loaded.

The other policies are the comparison points from the paper's evaluation: least requests, least masked
tokens in flight, round robin.
"""
from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from .costmodel import AnalyticalCostModel, CostModel, ModelShape


@dataclass(frozen=True)
class Work:
    """One request on a worker: masked tokens it computes per step (per guidance branch), steps left."""

    tokens: int
    steps_left: int


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

    @property
    def in_flight(self) -> int:
        return len(self.running) + len(self.waiting)

    @property
    def tokens_in_flight(self) -> int:
        return sum(w.tokens for w in itertools.chain(self.running, self.waiting))

    @property
    def has_room(self) -> bool:
        return self.in_flight < self.capacity


@dataclass(frozen=True)
class PlacementRequest:
    model_id: str
    template_id: str
    tokens: int  # masked tokens per step per guidance branch
    steps: int
    cache_bytes: int = 0


@dataclass(frozen=True)
class Choice:
    worker_id: str
    predicted_seconds: float


class PlacementPolicy(ABC):
    name = "abstract"

    @abstractmethod
    def choose(self, request: PlacementRequest, workers: list[WorkerView]) -> Choice | None:
        """The worker for `request` among `workers` (already filtered to its model), or None if none has room."""


def predict_finish(view: WorkerView, request: PlacementRequest, cost: CostModel) -> float:
    """Seconds until `request` would finish on `view`, simulating step-level continuous batching."""
    ready_at = 0.0 if request.template_id in view.resident else cost.transfer_seconds(
        request.cache_bytes // 2 if request.template_id in view.loading else request.cache_bytes)
    running = [[w.tokens, w.steps_left] for w in view.running if w.steps_left > 0]
    waiting = [[w.tokens, w.steps_left] for w in view.waiting if w.steps_left > 0]
    mine = [max(1, request.tokens), max(1, request.steps)]
    waiting.append(mine)
    batch_size = max(1, view.max_batch_size)
    t = 0.0
    while True:
        # Admit FCFS while there is room; the new request only once its cache is here.
        while waiting and len(running) < batch_size:
            if waiting[0] is mine and t < ready_at:
                break
            running.append(waiting.pop(0))
        if not running:  # only the new request is left and its cache is still on its way
            t = ready_at
            continue
        step = cost.step_seconds(view.shape, [r[0] for r in running])
        # Run until the next request leaves (or the new request's cache arrives and it could join).
        steps = min(r[1] for r in running)
        if any(r is mine for r in waiting) and t < ready_at and len(running) < batch_size:
            steps = max(1, min(steps, int((ready_at - t) / step) + 1))
        t += steps * step
        for r in running:
            r[1] -= steps
        if mine[1] <= 0:
            return t
        running = [r for r in running if r[1] > 0]


class PredictedFinish(PlacementPolicy):
    name = "predicted-finish"

    def __init__(self, cost: CostModel | None = None):
        self.cost = cost or AnalyticalCostModel()

    def choose(self, request: PlacementRequest, workers: list[WorkerView]) -> Choice | None:
        best, best_key = None, None
        for view in workers:
            if not view.has_room:
                continue
            finish = predict_finish(view, request, self.cost)
            # Round to a microsecond so that equal predictions tie and affinity decides.
            key = (round(finish, 6), request.template_id not in view.resident, view.in_flight, view.worker_id)
            if best_key is None or key < best_key:
                best, best_key = Choice(view.worker_id, finish), key
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


def make_policy(name: str, cost: CostModel | None = None) -> PlacementPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown placement policy {name!r}; choose one of {sorted(POLICIES)}")
    return PredictedFinish(cost) if name == PredictedFinish.name else POLICIES[name]()
