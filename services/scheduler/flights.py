"""Requests in flight through the scheduler: one `Flight` per (tenant, request id), shared by every caller.

A flight runs once, as its own asyncio task, whoever asked for it. Callers subscribe: they get what the
flight published so far (placement, queue position, the latest step, ...), then every later event, then the
outcome. That is what makes an edit idempotent by request id: a retry of a request that is still running
follows the same run, and a retry of one that finished returns the same result without running it again.
A flight that failed is forgotten at once, so a retry runs the edit anew (it produced nothing the first time).
The flight is cancelled when its last caller goes away before it is done: a client that disconnects frees
its batch slot.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable

from instgenie.status import StatusInfo

_END = object()


@dataclass
class Flight:
    key: Hashable
    fingerprint: bytes
    kind: str = "edit"
    log: list = field(default_factory=list)
    subscribers: set = field(default_factory=set)
    done: bool = False
    error: StatusInfo | None = None
    task: asyncio.Task | None = None
    worker_id: str = ""
    created: float = field(default_factory=time.monotonic)
    finished_at: float | None = None
    #: drop earlier progress from the replay log: a late subscriber needs the latest step, not every step
    is_progress: Callable[[object], bool] = lambda msg: False

    def publish(self, msg) -> None:
        if self.log and self.is_progress(msg) and self.is_progress(self.log[-1]):
            self.log[-1] = msg
        else:
            self.log.append(msg)
        for q in self.subscribers:
            q.put_nowait(msg)

    def finish(self, error: StatusInfo | None = None) -> None:
        if self.done:
            return
        self.done, self.error, self.finished_at = True, error, time.monotonic()
        for q in self.subscribers:
            q.put_nowait(_END)

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        for msg in self.log:
            q.put_nowait(msg)
        if self.done:
            q.put_nowait(_END)
        self.subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        """Leave; the flight is cancelled when its last caller leaves before it is done."""
        self.subscribers.discard(q)
        if not self.subscribers and not self.done and self.task is not None:
            self.task.cancel()

    async def events(self, q: asyncio.Queue):
        """The subscriber's messages until the flight ends."""
        while True:
            msg = await q.get()
            if msg is _END:
                return
            yield msg


class FlightTable:
    """Flights by key; finished ones are kept `ttl` seconds (at most `max_finished`) to answer retries."""

    def __init__(self, ttl: float = 600.0, max_finished: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.max_finished = max_finished
        self.clock = clock
        self._flights: dict[Hashable, Flight] = {}

    def get(self, key: Hashable) -> Flight | None:
        flight = self._flights.get(key)
        if flight is not None and flight.done and flight.error is not None:
            # Failed, cancelled or expired: it produced nothing, so a retry runs it again.
            del self._flights[key]
            return None
        return flight

    def add(self, flight: Flight) -> None:
        self.sweep()
        self._flights[flight.key] = flight

    def forget(self, key: Hashable) -> None:
        self._flights.pop(key, None)

    def running(self) -> list[Flight]:
        return [f for f in self._flights.values() if not f.done]

    def sweep(self) -> None:
        now = self.clock()
        finished = [f for f in self._flights.values() if f.done]
        for f in finished:
            if f.error is not None or now - (f.finished_at or now) > self.ttl:
                self._flights.pop(f.key, None)
        finished = sorted((f for f in self._flights.values() if f.done), key=lambda f: f.finished_at or 0)
        for f in finished[:max(0, len(finished) - self.max_finished)]:
            self._flights.pop(f.key, None)

    def __len__(self) -> int:
        return len(self._flights)
