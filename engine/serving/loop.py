"""The worker-local engine loop: one iteration = one denoising step of the running batch.

Pre-processing (mask/prompt/image encoding, cache lookup: `Editor.start`) runs in a thread pool, and
post-processing (VAE decode, paste-back: `Editor.finish`) in another, so neither stalls a step; torch releases
the GIL inside its kernels, so these threads overlap with the loop's compute. A request enters the scheduler
only once pre-processed, joins the running batch at the next step, and leaves as soon as it is done.

Nothing one request does can take the loop down: errors of a request's own parts fail that request only; if
the shared transformer call itself fails, each request of that batch is retried alone to find the culprit.
"""
from __future__ import annotations

import concurrent.futures as cf
import enum
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import EngineStoppedError, InstGenIEError, InvalidInputError, RequestInFlightError
from ..request import EditRequest, EditResult, RequestState
from ..step import batch_key
from .scheduler import Entry, Event, Status, StepScheduler

log = logging.getLogger(__name__)


class RequestAborted(InstGenIEError):
    """The request ended without a result: cancelled, past its deadline, or failed during a step."""

    _CODES = {Status.CANCELLED: ("CANCELLED", "CANCELLED"), Status.EXPIRED: ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED")}

    def __init__(self, status: Status, message: str):
        super().__init__(message)
        self.status = status
        self.grpc_code, self.code = self._CODES.get(status, ("INTERNAL", "EDIT_FAILED"))


class CancelOutcome(enum.Enum):
    """What `EngineLoop.cancel` did. Truthy only for CANCELLED, so callers that treat it as a bool still work."""

    CANCELLED = "cancelled"  # the request will not produce a result (its future raises RequestAborted)
    ALREADY_FINISHED = "already_finished"  # it left the step loop (decoding or done): a no-op, the result comes
    NOT_FOUND = "not_found"  # no request with that id is in flight here

    def __bool__(self) -> bool:
        return self is CancelOutcome.CANCELLED


class Phase(enum.Enum):
    PREPARING = "preparing"  # submitted, pre-processing (or pre-processed and about to be scheduled)
    SCHEDULED = "scheduled"  # in the step scheduler: waiting for a slot or running steps
    FINISHING = "finishing"  # all steps done, being decoded
    DONE = "done"


@dataclass
class Timing:
    submitted: float
    prepared: float | None = None
    admitted: float | None = None
    denoised: float | None = None
    finished: float | None = None

    @property
    def queue_seconds(self) -> float | None:
        return None if self.admitted is None else self.admitted - self.submitted

    @property
    def latency_seconds(self) -> float | None:
        return None if self.finished is None else self.finished - self.submitted


@dataclass
class EditHandle:
    """The client's side of a submitted request: a future, a stream of events, cancellation.

    `events` receives every scheduler Event of the request, then None once the future is resolved; it is
    anything with `put` (a queue.Queue by default; the worker passes a bridge into asyncio).
    """

    request: EditRequest
    future: cf.Future = field(default_factory=cf.Future)
    events: object = field(default_factory=queue.Queue)
    timing: Timing = field(default_factory=lambda: Timing(time.monotonic()))
    _loop: "EngineLoop | None" = None
    phase: Phase = Phase.PREPARING  # changed under the loop's lock only
    cancel_requested: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def result(self, timeout: float | None = None) -> EditResult:
        return self.future.result(timeout)

    def cancel(self) -> CancelOutcome:
        return self._loop.cancel(self.request_id) if self._loop else CancelOutcome.NOT_FOUND


@dataclass(frozen=True)
class RequestLoad:
    """One request as a load report shows it."""

    request_id: str
    template_id: str
    steps_done: int
    total_steps: int
    tokens: int  # image tokens it computes per step, over its guidance branches


@dataclass(frozen=True)
class LoopSnapshot:
    """A consistent view of the loop for load reports and queue positions."""

    running: tuple[RequestLoad, ...]
    waiting: tuple[RequestLoad, ...]  # queue order: the first is admitted next
    preparing: int  # submitted, still pre-processing
    finishing: int  # steps done, being decoded
    steps: int  # denoising steps run since the loop started (monotonic)

    @property
    def in_flight(self) -> int:
        return len(self.running) + len(self.waiting) + self.preparing + self.finishing


@dataclass
class LoopStats:
    steps: int = 0
    step_seconds: float = 0.0  # wall time inside the transformer step
    overhead_cpu_seconds: float = 0.0  # CPU time of scheduling + bookkeeping around the steps
    isolations: int = 0


class EngineLoop:
    """Drives one Editor: pre-processing pool -> step scheduler -> post-processing pool.

    Thread-safe client API: `submit`, `cancel`, `snapshot`, `in_flight`, `stop` may be called from any thread.
    A request id is unique among requests in flight; once a request's future is resolved nothing of it remains
    (the id may be reused at once).
    """

    def __init__(self, editor, *, max_batch_size: int = 8, max_tokens_per_step: int | None = None,
                 continuous: bool = True, pre_workers: int = 1, post_workers: int = 1, planner=None,
                 clock: Callable[[], float] = time.monotonic):
        self.editor = editor
        # Request deadlines are read on this clock (time.monotonic); tests inject one that cannot race the CPU.
        self.clock = clock
        self.scheduler = StepScheduler(max_batch_size, max_tokens_per_step, continuous, clock=clock)
        self.planner = planner  # optional: states -> per-block use_cache list (Y mode)
        self._pre = cf.ThreadPoolExecutor(pre_workers, thread_name_prefix="instgenie-pre")
        self._post = cf.ThreadPoolExecutor(post_workers, thread_name_prefix="instgenie-post")
        self._warm = cf.ThreadPoolExecutor(1, thread_name_prefix="instgenie-warm")
        self._handles: dict[str, EditHandle] = {}  # every request in flight, by id (guarded by _lock)
        # Loop thread only: scheduled requests, by id, with their handle (ids are unique among these).
        self._scheduled: dict[str, tuple[EditHandle, RequestState]] = {}
        self._ready: queue.Queue = queue.Queue()
        self._commands: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._published: tuple[tuple, tuple] = ((), ())  # (running, waiting), replaced whole by the loop thread
        self.stats = LoopStats()
        self._thread = threading.Thread(target=self._run, name="instgenie-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------ client API
    def submit(self, request: EditRequest, *, events=None) -> EditHandle:
        """Queue a request for pre-processing; its scalar fields are validated here (typed errors)."""
        if self._stop.is_set():
            raise EngineStoppedError("the engine loop is stopped")
        if not isinstance(request, EditRequest):
            raise InvalidInputError(f"expected an EditRequest, got {type(request).__name__}")
        request.validate()
        handle = EditHandle(request, _loop=self, **({} if events is None else {"events": events}))
        with self._lock:
            if request.request_id in self._handles:
                raise RequestInFlightError(f"request id {request.request_id!r} is already in flight",
                                           field="request_id")
            self._handles[request.request_id] = handle
        try:
            # Warm the template's cache now, while the request waits for pre-processing and a batch slot.
            self._warm.submit(self._prefetch, request.template_id)
            self._pre.submit(self._prepare, handle)
        except RuntimeError:  # the pools shut down: stop() raced this submit
            self._resolve(handle, exc=EngineStoppedError("the engine loop is stopped"))
            raise EngineStoppedError("the engine loop is stopped") from None
        return handle

    def _prefetch(self, template_id: str) -> None:
        try:
            self.editor.prefetch(template_id)
        except Exception as exc:  # noqa: BLE001 - the request itself will report the problem
            log.debug("prefetch of %s failed: %s", template_id, exc)

    def cancel(self, request_id: str) -> CancelOutcome:
        """Cancel a request in flight. CANCELLED means it will never produce a result.

        Before it is scheduled it is resolved at once; once scheduled it leaves at the next step boundary (and
        should its last step complete first, it is still resolved as cancelled). After the step loop (decoding)
        the cancel is a no-op: ALREADY_FINISHED, and the result is delivered.
        """
        with self._lock:
            handle = self._handles.get(request_id)
            if handle is None:
                return CancelOutcome.NOT_FOUND
            if handle.cancel_requested:
                return CancelOutcome.CANCELLED
            if handle.phase in (Phase.FINISHING, Phase.DONE) or handle.future.done():
                return CancelOutcome.ALREADY_FINISHED
            handle.cancel_requested = True
            phase = handle.phase
        if phase is Phase.PREPARING:
            # Never scheduled: nothing to free. Its pre-processing result, if any, is dropped when it arrives.
            self._resolve(handle, exc=RequestAborted(Status.CANCELLED, "cancelled by the client"))
        else:
            self._commands.put(("cancel", handle))
            self._wake.set()
        return CancelOutcome.CANCELLED

    def in_flight(self) -> int:
        with self._lock:
            return len(self._handles)

    def snapshot(self) -> LoopSnapshot:
        """Running and waiting requests (as of the last loop iteration), pre-processing and decoding counts."""
        running, waiting = self._published
        with self._lock:
            phases = [h.phase for h in self._handles.values()]
        return LoopSnapshot(running=running, waiting=waiting, preparing=phases.count(Phase.PREPARING),
                            finishing=phases.count(Phase.FINISHING), steps=self.stats.steps)

    def stop(self, drain: bool = True, timeout: float = 60.0) -> None:
        """Stop accepting work; with drain, finish what is queued and running first."""
        if drain:
            end = time.monotonic() + timeout
            while self.in_flight() and time.monotonic() < end:
                time.sleep(0.01)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self._pre.shutdown(wait=True, cancel_futures=True)
        self._warm.shutdown(wait=False, cancel_futures=True)
        self._post.shutdown(wait=True)
        with self._lock:
            handles = list(self._handles.values())
        for h in handles:
            self._resolve(h, exc=RequestAborted(Status.CANCELLED, "the engine stopped before the request finished"))
        self._scheduled.clear()

    # ----------------------------------------------------------------------------------- pipeline
    def _prepare(self, handle: EditHandle) -> None:
        req = handle.request
        if handle.cancel_requested:
            return  # cancelled while queued for pre-processing: already resolved
        try:
            if req.deadline is not None and self.clock() > req.deadline:
                raise RequestAborted(Status.EXPIRED, "deadline exceeded before pre-processing")
            state = self.editor.start(req)
        except Exception as exc:  # noqa: BLE001 - every failure goes back to its own client
            self._resolve(handle, exc=exc)
            return
        handle.timing.prepared = time.monotonic()
        self._ready.put((handle, state))
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._iterate()
            except Exception:  # noqa: BLE001 - the loop must survive anything; log and go on
                log.exception("engine loop iteration failed")
                time.sleep(0.01)

    def _iterate(self) -> None:
        cpu0 = time.thread_time()
        self._intake()
        plan = self.scheduler.schedule()
        self._dispatch(self.scheduler.drain_events())
        self._publish()  # the batch about to step and the queue behind it
        if plan is None:
            self.stats.overhead_cpu_seconds += time.thread_time() - cpu0
            deadline = self.scheduler.next_deadline()
            wait = 0.5 if deadline is None else max(0.0, min(0.5, deadline - self.clock()))
            self._wake.wait(wait)
            self._wake.clear()
            return
        states = [self._scheduled[rid][1] for rid in plan.request_ids]
        use_cache = self.planner(states) if self.planner else None
        cpu1 = time.thread_time()
        t0 = time.perf_counter()
        failed = self._step(states, use_cache)
        self.stats.step_seconds += time.perf_counter() - t0
        cpu2 = time.thread_time()
        events = self.scheduler.update(plan, failed)
        self.stats.steps += 1
        self._dispatch(events)
        self._publish()
        self.stats.overhead_cpu_seconds += (cpu1 - cpu0) + (time.thread_time() - cpu2)

    def _publish(self) -> None:
        """Replace the snapshot's scheduler view (one reference swap: readers never see a half update)."""
        def load(e: Entry) -> RequestLoad:
            return RequestLoad(e.request_id, e.template_id, e.steps_done, e.total_steps, e.tokens)

        self._published = (tuple(load(e) for e in self.scheduler.running.values()),
                           tuple(load(e) for e in self.scheduler.waiting))

    def _step(self, states: list[RequestState], use_cache) -> dict[str, str]:
        try:
            return self.editor.step(states, use_cache)
        except Exception as exc:  # noqa: BLE001
            if len(states) == 1:
                return {states[0].request.request_id: f"{type(exc).__name__}: {exc}"}
            # Find the culprit: every request of the batch runs its step alone.
            self.stats.isolations += 1
            failed = {}
            for s in states:
                failed.update(self._step([s], use_cache))
            return failed

    def _intake(self) -> None:
        while True:
            try:
                cmd, handle = self._commands.get_nowait()
            except queue.Empty:
                break
            entry = self._scheduled.get(handle.request_id)
            if cmd == "cancel" and entry is not None and entry[0] is handle:
                self.scheduler.cancel(handle.request_id)  # False if its last step just ended: _dispatch decides
        while True:
            try:
                handle, state = self._ready.get_nowait()
            except queue.Empty:
                break
            rid = state.request.request_id
            with self._lock:
                if handle.cancel_requested or handle.future.done():
                    continue  # cancelled during pre-processing: already resolved, its state is dropped here
                handle.phase = Phase.SCHEDULED  # from here on a cancel goes through the scheduler
            try:
                self.scheduler.add(Entry(
                    request_id=rid, key=batch_key(state), tokens=int(state.mask.index.numel()) * state.branches,
                    total_steps=state.total_steps, deadline=state.request.deadline,
                    template_id=state.request.template_id,
                ))
            except ValueError as exc:  # e.g. more tokens than a step may hold: this request can never run
                self._resolve(handle, exc=InvalidInputError(str(exc), field="mask"))
                continue
            self._scheduled[rid] = (handle, state)

    def _dispatch(self, events: list[Event]) -> None:
        for ev in events:
            entry = self._scheduled.get(ev.request_id)
            if entry is None:
                continue
            handle, state = entry
            if ev.status == Status.RUNNING and ev.steps_done == 0:
                handle.timing.admitted = time.monotonic()
            if not ev.status.terminal:
                handle.events.put(ev)
                continue
            del self._scheduled[ev.request_id]
            self.scheduler.forget(ev.request_id)
            if ev.status == Status.FINISHED:
                with self._lock:
                    cancelled = handle.cancel_requested  # cancel() said CANCELLED: no result may be delivered
                    if not cancelled:
                        handle.phase = Phase.FINISHING
                if not cancelled:
                    handle.events.put(ev)
                    handle.timing.denoised = time.monotonic()
                    try:
                        self._post.submit(self._finish, handle, state)
                    except RuntimeError:  # the post pool shut down (stop)
                        self._resolve(handle, exc=EngineStoppedError("the engine stopped before decoding"))
                    continue
                ev = Event(ev.request_id, Status.CANCELLED, ev.steps_done, ev.total_steps, "cancelled by the client",
                           ev.batch_size)
            handle.events.put(ev)
            self._resolve(handle, exc=RequestAborted(ev.status, ev.error or ev.status.value))

    def _finish(self, handle: EditHandle, state: RequestState) -> None:
        try:
            result = self.editor.finish(state)
        except Exception as exc:  # noqa: BLE001
            self._resolve(handle, exc=exc)
            return
        self._resolve(handle, result=result)

    def _resolve(self, handle: EditHandle, result=None, exc: BaseException | None = None) -> None:
        with self._lock:
            if self._handles.get(handle.request_id) is handle:  # the id may already belong to a newer request
                del self._handles[handle.request_id]
            handle.phase = Phase.DONE
        handle.timing.finished = handle.timing.finished or time.monotonic()
        try:
            if exc is not None:
                handle.future.set_exception(exc)
            else:
                handle.future.set_result(result)
        except cf.InvalidStateError:
            return  # resolved already (e.g. cancelled while its pre-processing failed)
        handle.events.put(None)  # end of stream
