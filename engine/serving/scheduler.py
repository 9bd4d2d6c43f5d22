"""The step scheduler: which requests run the next denoising step. Pure Python, no tensors.

vLLM's contract: one `schedule()` call plans exactly one denoising step of the running batch, and
`update()` takes that step's outcome. A request that finished pre-processing waits in the queue and joins the
running batch at the next step if the batch has room (max requests, max computed tokens per step); a request
that has run all its steps, was cancelled or ran past its deadline leaves at the next step boundary.

Requests share a step only if their batch key matches (model, resolution, cache mode, text length, path).
When several keys are running, steps alternate between the key groups, oldest-served first.
With `continuous=False` the scheduler is a request-level static batcher (the classic baseline): a batch is
formed only when nothing runs, and no request joins until the whole batch has finished.
"""
from __future__ import annotations

import enum
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Hashable


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    EXPIRED = "expired"  # deadline passed
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self not in (Status.WAITING, Status.RUNNING)


@dataclass
class Entry:
    """What the scheduler knows of a request."""

    request_id: str
    key: Hashable
    tokens: int  # image tokens it computes per step, over all its guidance branches
    total_steps: int
    deadline: float | None = None
    arrival: float = 0.0
    steps_done: int = 0
    status: Status = Status.WAITING
    admitted_at: float | None = None
    last_step: float = 0.0
    error: str | None = None
    template_id: str = ""  # for load reports only; scheduling never looks at it


@dataclass
class StepPlan:
    step_id: int
    request_ids: list[str]
    key: Hashable
    tokens: int


@dataclass
class Event:
    """Something a client cares about: progress of a step, admission, or a terminal status."""

    request_id: str
    status: Status
    steps_done: int
    total_steps: int
    error: str | None = None
    #: requests in the step that produced this event; for an admission (steps_done 0) the batch it joins;
    #: 0 for events no step produced (cancel or expiry between steps)
    batch_size: int = 0


@dataclass
class SchedulerStats:
    steps: int = 0
    admitted: int = 0
    finished: int = 0
    cancelled: int = 0
    expired: int = 0
    failed: int = 0
    batch_sizes: list[int] = field(default_factory=list)


class StepScheduler:
    def __init__(self, max_batch_size: int = 8, max_tokens_per_step: int | None = None, continuous: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.max_tokens_per_step = max_tokens_per_step
        self.continuous = continuous
        self.clock = clock
        self.waiting: deque[Entry] = deque()
        self.running: dict[str, Entry] = {}
        self.entries: dict[str, Entry] = {}
        self._cancelled: set[str] = set()
        self._step_ids = itertools.count()
        self.stats = SchedulerStats()
        self._pending_events: list[Event] = []

    # -------------------------------------------------------------------------------------- intake
    def add(self, entry: Entry) -> None:
        if entry.request_id in self.entries:
            raise ValueError(f"request {entry.request_id!r} is already scheduled")
        if self.max_tokens_per_step is not None and entry.tokens > self.max_tokens_per_step:
            raise ValueError(f"request {entry.request_id!r} computes {entry.tokens} tokens per step, more than the "
                             f"step limit {self.max_tokens_per_step}")
        entry.arrival = entry.arrival or self.clock()
        entry.status = Status.WAITING
        self.entries[entry.request_id] = entry
        self.waiting.append(entry)

    def cancel(self, request_id: str) -> bool:
        """Mark for cancellation; the request leaves at the next step boundary. False if unknown or done."""
        entry = self.entries.get(request_id)
        if entry is None or entry.status.terminal:
            return False
        self._cancelled.add(request_id)
        return True

    def fail(self, request_id: str, error: str) -> None:
        """A request failed outside a step (e.g. its cache could not be read); it leaves now."""
        entry = self.entries.get(request_id)
        if entry is not None and not entry.status.terminal:
            self._finish(entry, Status.FAILED, error)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def next_deadline(self) -> float | None:
        deadlines = [e.deadline for e in itertools.chain(self.waiting, self.running.values()) if e.deadline]
        return min(deadlines) if deadlines else None

    # ------------------------------------------------------------------------------------- planning
    def schedule(self) -> StepPlan | None:
        """Plan the next step, or None if nothing can run."""
        self._drop_cancelled_and_expired()
        self._admit()
        if not self.running:
            return None
        groups: dict[Hashable, list[Entry]] = {}
        for e in self.running.values():
            groups.setdefault(e.key, []).append(e)
        # the group whose least recently served member has waited longest goes next
        key, members = min(groups.items(), key=lambda kv: min(m.last_step for m in kv[1]))
        plan = StepPlan(next(self._step_ids), [m.request_id for m in members], key, sum(m.tokens for m in members))
        self.stats.steps += 1
        self.stats.batch_sizes.append(len(members))
        return plan

    def _admit(self) -> None:
        if not self.continuous and self.running:
            return  # static batching: nobody joins a running batch
        tokens = sum(e.tokens for e in self.running.values())
        now = self.clock()
        kept: deque[Entry] = deque()
        admitted: list[tuple[Event, Hashable]] = []
        while self.waiting:
            e = self.waiting.popleft()
            room = len(self.running) < self.max_batch_size
            fits = self.max_tokens_per_step is None or tokens + e.tokens <= self.max_tokens_per_step
            if room and fits:
                e.status, e.admitted_at, e.last_step = Status.RUNNING, now, e.arrival
                self.running[e.request_id] = e
                tokens += e.tokens
                self.stats.admitted += 1
                admitted.append((Event(e.request_id, Status.RUNNING, 0, e.total_steps), e.key))
            else:
                kept.append(e)
                if not room:
                    break  # FCFS: nobody overtakes a request that did not fit for lack of slots
        kept.extend(self.waiting)
        self.waiting = kept
        for ev, key in admitted:  # the batch an admitted request joins: its key group, as it stands now
            ev.batch_size = sum(1 for r in self.running.values() if r.key == key)
            self._pending_events.append(ev)

    def _drop_cancelled_and_expired(self) -> None:
        now = self.clock()
        for e in list(itertools.chain(self.waiting, self.running.values())):
            if e.request_id in self._cancelled:
                self._finish(e, Status.CANCELLED, "cancelled by the client")
            elif e.deadline is not None and now > e.deadline:
                self._finish(e, Status.EXPIRED,
                             f"deadline exceeded after {e.steps_done} of {e.total_steps} steps")

    def _finish(self, e: Entry, status: Status, error: str | None = None, batch_size: int = 0) -> None:
        self.running.pop(e.request_id, None)
        if e.status == Status.WAITING:
            self.waiting = deque(w for w in self.waiting if w.request_id != e.request_id)
        e.status, e.error = status, error
        self._cancelled.discard(e.request_id)
        setattr(self.stats, status.value, getattr(self.stats, status.value) + 1)
        self._pending_events.append(Event(e.request_id, status, e.steps_done, e.total_steps, error, batch_size))

    # -------------------------------------------------------------------------------------- results
    def update(self, plan: StepPlan, failed: dict[str, str] | None = None) -> list[Event]:
        """Record the outcome of `plan`'s step. `failed` maps request ids whose step failed to the error."""
        failed = failed or {}
        now = self.clock()
        size = len(plan.request_ids)
        for rid in plan.request_ids:
            e = self.entries[rid]
            if e.status.terminal:
                continue
            if rid in failed:
                self._finish(e, Status.FAILED, failed[rid], size)
                continue
            e.steps_done += 1
            e.last_step = now
            if e.steps_done >= e.total_steps:
                self._finish(e, Status.FINISHED, batch_size=size)
            else:
                self._pending_events.append(Event(rid, Status.RUNNING, e.steps_done, e.total_steps, batch_size=size))
        return self.drain_events()

    def drain_events(self) -> list[Event]:
        events, self._pending_events = self._pending_events, []
        return events

    def forget(self, request_id: str) -> None:
        """Drop the record of a terminal request (the loop calls it once the client has its answer)."""
        e = self.entries.get(request_id)
        if e is not None and e.status.terminal:
            del self.entries[request_id]
