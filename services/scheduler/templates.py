"""Template placement: how hot each template is, and which workers should warm which templates ahead of demand.

Placement already warms a template no worker holds where it costs least: the predicted finish includes the
object-store transfer, so a cold request lands where transfer plus queueing is smallest, and the chosen worker
starts loading at once. This module adds the proactive part. A template's *heat* is its request rate, an
exponentially decaying count. A template should be resident on about `share x workers x replication` workers
(rounded up), so a template with more than one worker's share of the traffic is kept warm on several, and its
traffic can spread without each spill paying a cold load. When fewer hold it, `WarmPlanner` picks the workers
where warming costs least: free host memory first (nothing is evicted), else the worker whose coldest resident
template is coldest (the host tier's LRU will most likely evict that one), then the least loaded; and it never
evicts for a template whose heat per replica is below the victim's (warming must not thrash a small host
memory). Eviction itself stays the host tier's LRU. Pure Python, no gRPC: the scheduler sends the plan as
WarmTemplate calls, the simulator applies it to its workers.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .placement import WorkerView


@dataclass
class _Heat:
    value: float
    at: float
    model_id: str
    cache_bytes: int


class TemplateHeat:
    """Requests per template as a count decaying with `half_life` seconds (about rate x half_life / ln 2)."""

    def __init__(self, half_life: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.half_life = half_life
        self.clock = clock
        self._heat: dict[str, _Heat] = {}

    def _decayed(self, h: _Heat, now: float) -> float:
        return h.value * 0.5 ** ((now - h.at) / self.half_life)

    def observe(self, template_id: str, model_id: str, cache_bytes: int, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        h = self._heat.get(template_id)
        if h is None:
            self._heat[template_id] = _Heat(1.0, now, model_id, cache_bytes)
        else:
            h.value, h.at, h.cache_bytes = self._decayed(h, now) + 1.0, now, cache_bytes or h.cache_bytes

    def heat(self, template_id: str, now: float | None = None) -> float:
        h = self._heat.get(template_id)
        return 0.0 if h is None else self._decayed(h, self.clock() if now is None else now)

    def forget(self, template_id: str) -> None:
        self._heat.pop(template_id, None)

    def snapshot(self, now: float | None = None, floor: float = 0.05) -> dict[str, tuple[float, str, int]]:
        """template -> (heat, model, cache bytes); drops templates colder than `floor` for good."""
        now = self.clock() if now is None else now
        out = {}
        for tid, h in list(self._heat.items()):
            v = self._decayed(h, now)
            if v < floor:
                del self._heat[tid]
            else:
                out[tid] = (v, h.model_id, h.cache_bytes)
        return out


@dataclass(frozen=True)
class WarmAction:
    worker_id: str
    template_id: str
    cache_bytes: int


@dataclass
class WarmPlanner:
    """Which (worker, template) pairs to warm now. Stateless but for warms it issued and has not seen land."""

    #: replicas wanted = ceil(share of the model's traffic x workers x replication)
    replication: float = 1.0
    #: a template colder than this (decayed request count) gets no proactive warming at all
    min_heat: float = 4.0
    #: warms issued per planning round (each is a whole template cache over a worker's store link)
    max_per_round: int = 4
    #: a worker gets no new warm while one it was sent is younger than this (seconds) and not yet resident
    pending_seconds: float = 10.0
    #: templates a worker's host memory holds, when views carry no byte figures (the simulator)
    _pending: dict[tuple[str, str], float] = field(default_factory=dict)

    def wanted(self, share: float, workers: int) -> int:
        return min(workers, max(1, math.ceil(share * workers * self.replication - 1e-9)))

    def plan(self, views: Iterable[WorkerView], heat: dict[str, tuple[float, str, int]], now: float,
             host_free: Callable[[WorkerView, int], bool] | None = None) -> list[WarmAction]:
        """Warm actions for this round. `host_free(view, nbytes)`: whether the worker has room without evicting
        (unknown: assume not)."""
        views = [v for v in views if v.has_room]
        self._pending = {k: t for k, t in self._pending.items() if now - t < self.pending_seconds}
        busy = {w for (w, _) in self._pending}
        by_model: dict[str, list[WorkerView]] = {}
        for v in views:
            by_model.setdefault(v.shape.model_id, []).append(v)
        totals: dict[str, float] = {}
        for value, model, _ in heat.values():
            totals[model] = totals.get(model, 0.0) + value
        actions: list[WarmAction] = []
        for tid, (value, model, nbytes) in sorted(heat.items(), key=lambda kv: -kv[1][0]):
            if value < self.min_heat or len(actions) >= self.max_per_round:
                break
            pool = by_model.get(model)
            if not pool:
                continue
            want = self.wanted(value / totals[model], len(pool))
            holders = sum(1 for v in pool if tid in v.resident or tid in v.loading
                          or (v.worker_id, tid) in self._pending)
            if holders >= want:
                continue
            candidates = [v for v in pool if v.worker_id not in busy and tid not in v.resident
                          and tid not in v.loading and (v.worker_id, tid) not in self._pending]
            for v in sorted(candidates, key=lambda v: self._cost(v, heat, nbytes, host_free))[:want - holders]:
                must_evict, victim = self._cost(v, heat, nbytes, host_free)[:2]
                if must_evict and victim >= value / want:
                    break  # evicting there costs more than this replica is worth (and elsewhere it is worse)
                actions.append(WarmAction(v.worker_id, tid, nbytes))
                self._pending[(v.worker_id, tid)] = now
                busy.add(v.worker_id)
                if len(actions) >= self.max_per_round:
                    break
        return actions

    @staticmethod
    def _cost(view: WorkerView, heat, nbytes: int, host_free) -> tuple:
        free = host_free(view, nbytes) if host_free else False
        victim = 0.0 if free else min((heat.get(t, (0.0,))[0] for t in view.resident), default=0.0)
        return (not free, victim, view.tokens_in_flight, view.in_flight, view.worker_id)

    def landed(self, worker_id: str, template_id: str) -> None:
        self._pending.pop((worker_id, template_id), None)
