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
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import InstGenIEError, InvalidInputError
from ..request import EditRequest, EditResult, RequestState
from ..step import batch_key
from .scheduler import Entry, Event, Status, StepScheduler

log = logging.getLogger(__name__)


class RequestAborted(InstGenIEError):
    """The request ended without a result: cancelled, past its deadline, or failed during a step."""

    def __init__(self, status: Status, message: str):
        super().__init__(message)
        self.status = status
        self.grpc_code = {Status.CANCELLED: "CANCELLED", Status.EXPIRED: "DEADLINE_EXCEEDED"}.get(status, "INTERNAL")


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
    """The client's side of a submitted request: a future, a stream of events, cancellation."""

    request: EditRequest
    future: cf.Future = field(default_factory=cf.Future)
    events: queue.Queue = field(default_factory=queue.Queue)
    timing: Timing = field(default_factory=lambda: Timing(time.monotonic()))
    _loop: "EngineLoop | None" = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def result(self, timeout: float | None = None) -> EditResult:
        return self.future.result(timeout)

    def cancel(self) -> bool:
        return self._loop.cancel(self.request_id) if self._loop else False


@dataclass
class LoopStats:
    steps: int = 0
    step_seconds: float = 0.0  # wall time inside the transformer step
    overhead_cpu_seconds: float = 0.0  # CPU time of scheduling + bookkeeping around the steps
    isolations: int = 0


class EngineLoop:
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
        self._handles: dict[str, EditHandle] = {}
        self._states: dict[str, RequestState] = {}
        self._ready: queue.Queue = queue.Queue()
        self._commands: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._cancel_early: set[str] = set()
        self.stats = LoopStats()
        self._thread = threading.Thread(target=self._run, name="instgenie-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------ client API
    def submit(self, request: EditRequest) -> EditHandle:
        if self._stop.is_set():
            raise RuntimeError("the engine loop is stopped")
        handle = EditHandle(request, _loop=self)
        with self._lock:
            if request.request_id in self._handles:
                raise ValueError(f"request id {request.request_id!r} is already in flight")
            self._handles[request.request_id] = handle
        # Warm the template's cache now, while the request waits for pre-processing and a batch slot.
        self._warm.submit(self._prefetch, request.template_id)
        self._pre.submit(self._prepare, handle)
        return handle

    def _prefetch(self, template_id: str) -> None:
        try:
            self.editor.prefetch(template_id)
        except Exception as exc:  # noqa: BLE001 - the request itself will report the problem
            log.debug("prefetch of %s failed: %s", template_id, exc)

    def cancel(self, request_id: str) -> bool:
        with self._lock:
            handle = self._handles.get(request_id)
        if handle is None or handle.future.done():
            return False
        self._commands.put(("cancel", request_id))
        self._wake.set()
        return True

    def in_flight(self) -> int:
        with self._lock:
            return len(self._handles)

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

    # ----------------------------------------------------------------------------------- pipeline
    def _prepare(self, handle: EditHandle) -> None:
        req = handle.request
        try:
            if req.deadline is not None and self.clock() > req.deadline:
                raise RequestAborted(Status.EXPIRED, "deadline exceeded before pre-processing")
            state = self.editor.start(req)
        except Exception as exc:  # noqa: BLE001 - every failure goes back to its own client
            self._resolve(handle, exc=exc)
            return
        handle.timing.prepared = time.monotonic()
        self._ready.put(state)
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
        if plan is None:
            self.stats.overhead_cpu_seconds += time.thread_time() - cpu0
            deadline = self.scheduler.next_deadline()
            wait = 0.5 if deadline is None else max(0.0, min(0.5, deadline - self.clock()))
            self._wake.wait(wait)
            self._wake.clear()
            return
        states = [self._states[rid] for rid in plan.request_ids]
        use_cache = self.planner(states) if self.planner else None
        cpu1 = time.thread_time()
        t0 = time.perf_counter()
        failed = self._step(states, use_cache)
        self.stats.step_seconds += time.perf_counter() - t0
        cpu2 = time.thread_time()
        events = self.scheduler.update(plan, failed)
        self._dispatch(events)
        self.stats.steps += 1
        self.stats.overhead_cpu_seconds += (cpu1 - cpu0) + (time.thread_time() - cpu2)

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
                cmd, rid = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd == "cancel" and not self.scheduler.cancel(rid):
                self._cancel_early.add(rid)  # still pre-processing: dropped the moment it is ready
        while True:
            try:
                state = self._ready.get_nowait()
            except queue.Empty:
                break
            rid = state.request.request_id
            try:
                self.scheduler.add(Entry(
                    request_id=rid, key=batch_key(state), tokens=int(state.mask.index.numel()) * state.branches,
                    total_steps=state.total_steps, deadline=state.request.deadline,
                ))
            except ValueError as exc:  # e.g. more tokens than a step may hold: this request can never run
                with self._lock:
                    handle = self._handles.get(rid)
                if handle is not None:
                    self._resolve(handle, exc=InvalidInputError(str(exc)))
                continue
            self._states[rid] = state
            if rid in self._cancel_early:
                self._cancel_early.discard(rid)
                self.scheduler.cancel(rid)

    def _dispatch(self, events: list[Event]) -> None:
        for ev in events:
            with self._lock:
                handle = self._handles.get(ev.request_id)
            if handle is None:
                continue
            handle.events.put(ev)
            if ev.status == Status.RUNNING and ev.steps_done == 0:
                handle.timing.admitted = time.monotonic()
            if not ev.status.terminal:
                continue
            state = self._states.pop(ev.request_id, None)
            self.scheduler.forget(ev.request_id)
            if ev.status == Status.FINISHED and state is not None:
                handle.timing.denoised = time.monotonic()
                self._post.submit(self._finish, handle, state)
            else:
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
            self._handles.pop(handle.request_id, None)
        if handle.future.done():
            return
        handle.timing.finished = time.monotonic()
        if exc is not None:
            handle.future.set_exception(exc)
        else:
            handle.future.set_result(result)
        handle.events.put(None)  # end of stream
