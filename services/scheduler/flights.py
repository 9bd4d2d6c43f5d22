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
from collections import OrderedDict
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
    #: the OpenTelemetry context of the call that created the flight: its span's parent, whoever follows it
    trace_context: object = None
    #: drop earlier progress from the replay log: a late subscriber needs the latest step, not every step
    is_progress: Callable[[object], bool] = lambda msg: False
    #: told when the flight ends (its table moves it from running to finished)
    on_finish: Callable[["Flight"], None] | None = field(default=None, repr=False)

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
        if self.on_finish is not None:
            self.on_finish(self)

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
    """Flights by key; finished ones are kept `ttl` seconds (at most `max_finished`) to answer retries.

    Every edit adds a flight and admission counts the running ones, so neither may cost time in proportion to
    the finished flights kept for retries (up to `max_finished`): running flights are a dict of their own, and
    finished ones an ordered dict in the order they finished, swept from its oldest end.
    """

    def __init__(self, ttl: float = 600.0, max_finished: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.max_finished = max_finished
        self.clock = clock
        self._flights: dict[Hashable, Flight] = {}
        self._running: dict[Hashable, Flight] = {}
        self._finished: OrderedDict[Hashable, float] = OrderedDict()  # key -> when it finished, oldest first

    def get(self, key: Hashable) -> Flight | None:
        flight = self._flights.get(key)
        if flight is not None and flight.done and flight.error is not None:
            # Failed, cancelled or expired: it produced nothing, so a retry runs it again.
            self.forget(key)
            return None
        return flight

    def add(self, flight: Flight) -> None:
        self.sweep()
        self.forget(flight.key)
        self._flights[flight.key] = flight
        if flight.done:
            self._finished[flight.key] = self.clock()
        else:
            self._running[flight.key] = flight
            flight.on_finish = self._finished_one

    def _finished_one(self, flight: Flight) -> None:
        if self._flights.get(flight.key) is not flight:
            return  # already replaced or forgotten
        self._running.pop(flight.key, None)
        if flight.error is not None:
            self._flights.pop(flight.key, None)  # it produced nothing: a retry runs it again
        else:
            self._finished[flight.key] = self.clock()

    def forget(self, key: Hashable) -> None:
        self._flights.pop(key, None)
        self._running.pop(key, None)
        self._finished.pop(key, None)

    def running(self) -> list[Flight]:
        return list(self._running.values())

    def sweep(self) -> None:
        """Drop finished flights older than the ttl, then the oldest beyond `max_finished`."""
        deadline = self.clock() - self.ttl
        while self._finished:
            key, finished_at = next(iter(self._finished.items()))
            if finished_at >= deadline and len(self._finished) <= self.max_finished:
                break
            del self._finished[key]
            self._flights.pop(key, None)

    def __len__(self) -> int:
        return len(self._flights)
