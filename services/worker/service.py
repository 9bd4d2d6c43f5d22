"""The worker's gRPC service: edits as streams of step events, cancellation, template registration, warming.

The engine loop runs on its own threads; each edit's events cross into asyncio through `_Sink`, which the
engine loop writes to like a queue. The call's deadline becomes the edit's deadline (dropped at the next
step once past), and a caller that goes away cancels the edit at the next step. Registration runs on one
thread beside the loop (the engine allows it: see engine/editor.py), one template at a time.

With tracing on, each edit's server span gets an event per denoising step (step, total, batch size), added on
the engine's thread as the step ends, before progress is thinned for the caller; metrics are in metrics.py.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import io
import logging
import threading
import time

import grpc

from instgenie.engine.errors import InstGenIEError
from instgenie.engine.images import ImageLimits, decode_image, mask_from_image
from instgenie.engine.request import EditRequest
from instgenie.engine.serving.scheduler import Status
from instgenie.worker.v1 import worker_service_pb2 as wpb
from instgenie.worker.v1 import worker_service_pb2_grpc as wpb_grpc

from ..common.logs import request_id_var
from ..common.status import ServiceError, invalid, rpc, status_of
from ..common.telemetry import current_span
from .runtime import WorkerRuntime

log = logging.getLogger(__name__)

#: images this small are decoded/encoded on the event loop (a thread-pool hop costs more than the work)
INLINE_CODEC_BYTES = 16 * 1024
INLINE_CODEC_PIXELS = 64 * 64
#: how often a queued edit's position is re-read while nothing else happens
QUEUE_POLL_SECONDS = 0.5
_ABORT_CODES = {Status.CANCELLED: (grpc.StatusCode.CANCELLED, "CANCELLED"),
                Status.EXPIRED: (grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
                Status.FAILED: (grpc.StatusCode.INTERNAL, "EDIT_FAILED")}


class _Sink:
    """What the engine loop puts events into (from its threads); delivers them on the asyncio loop.

    Step progress is thinned here, on the engine's thread, to one per `progress_interval` seconds (the last
    step always passes): a skipped step then costs no wake-up of the event loop, whose thread would otherwise
    compete with the denoising loop for the GIL at every step.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, progress_interval: float = 0.0, engine=None,
                 preview_every: int = 0, span=None):
        self._loop = loop
        self.span = span  # the edit's recording span (tracing on), which gets an event per step
        self.queue: asyncio.Queue = asyncio.Queue()
        self.progress_interval = progress_interval
        self._last_progress = 0.0
        self._engine = engine
        self.preview_every = preview_every
        self._start = None  # the request's latents before its first step (previews need them)

    def put(self, item) -> None:
        if self.span is not None and item is not None and not isinstance(item, int):
            self._trace(item)
        if (self.progress_interval > 0 and item is not None and not isinstance(item, int)
                and item.status == Status.RUNNING and item.steps_done > 0):
            now = time.monotonic()
            if now - self._last_progress < self.progress_interval:
                return
            self._last_progress = now
        if self.preview_every and item is not None and not isinstance(item, int) and item.status == Status.RUNNING:
            snapshot = self._snapshot(item)
            if snapshot is not None:
                item = _Stepped(item, snapshot)
        self._loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _trace(self, ev) -> None:
        if ev.status == Status.RUNNING and ev.steps_done == 0:
            self.span.add_event("engine.started", {"batch_size": ev.batch_size})
        elif ev.status in (Status.RUNNING, Status.FINISHED):
            self.span.add_event("engine.step", {"step": ev.steps_done, "total_steps": ev.total_steps,
                                                "batch_size": ev.batch_size})
        else:
            self.span.add_event("engine." + ev.status.value, {"step": ev.steps_done})

    def _snapshot(self, ev):
        """On the engine's thread, between steps: references to what a preview needs (no copy, no compute).

        The engine loop hands events to this sink from its own thread right after a step, when nothing steps
        the request; its state is read there (EngineLoop keeps it in `_scheduled`; the engine offers no public
        accessor). A step replaces `state.latents` rather than writing into it, so the references stay valid.
        """
        try:
            entry = self._engine._scheduled.get(ev.request_id)
            if entry is None:
                return None
            state = entry[1]
            if ev.steps_done == 0:
                self._start = state.latents
                return None
            if self._start is None or ev.steps_done % self.preview_every or ev.steps_done >= ev.total_steps:
                return None
            return state, self._engine.editor.preview_inputs(state, self._start)
        except Exception:  # noqa: BLE001 - a preview is optional; the edit must never suffer for one
            log.debug("no preview snapshot for %s", ev.request_id, exc_info=True)
            return None


class _Stepped:
    """A step event with the snapshot its preview is made from."""

    __slots__ = ("event", "snapshot")

    def __init__(self, event, snapshot):
        self.event, self.snapshot = event, snapshot


class _Cancelled(Exception):
    """Raised inside a registration's progress callback when its caller went away."""


class WorkerService(wpb_grpc.WorkerServiceServicer):
    def __init__(self, runtime: WorkerRuntime, limits: ImageLimits | None = None, metrics=None):
        self.runtime = runtime
        #: WorkerMetrics (metrics.py) once the model is loaded; None: nothing is measured
        self.metrics = metrics
        self.limits = limits or ImageLimits()
        self.draining = False
        self._registrar = cf.ThreadPoolExecutor(1, thread_name_prefix="instgenie-register")
        self._codec = cf.ThreadPoolExecutor(2, thread_name_prefix="instgenie-codec")
        self.registrations = 0

    # ------------------------------------------------------------------------------------ helpers
    def _check_accepting(self) -> None:
        if self.draining:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "worker is draining (shutting down); the scheduler "
                               "places the request elsewhere", reason="DRAINING")
        if not self.runtime.ready.is_set():
            why = f": {self.runtime.load_error}" if self.runtime.load_error else ""
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"worker is not ready, its model is still loading{why}",
                               reason="NOT_READY")

    async def _run(self, fn, *args, pool=None):
        return await asyncio.get_running_loop().run_in_executor(pool or self._codec, fn, *args)

    # -------------------------------------------------------------------------------------- edits
    @rpc
    async def Edit(self, request, context):
        request_id_var.set(request.request_id or "-")
        self._check_accepting()
        if not request.request_id:
            raise invalid("request_id", "request_id is required")
        mask = self._decode_mask(request.mask) if len(request.mask) <= INLINE_CODEC_BYTES else \
            await self._run(self._decode_mask, request.mask)
        remaining = context.time_remaining()
        loop = self.runtime.loop
        deadline = None if remaining is None else loop.clock() + remaining
        edit = EditRequest(
            template_id=request.template_id, mask=mask, prompt=request.prompt, seed=int(request.seed),
            steps=int(request.steps) or None,
            guidance_scale=request.guidance_scale if request.HasField("guidance_scale") else None,
            dilate=int(request.dilate), deadline=deadline, request_id=request.request_id,
        )
        cache_tier = "host" if self.runtime.is_resident(request.template_id) else "store"
        span = current_span()
        if span is not None:
            span.set_attributes({"instgenie.request_id": request.request_id, "instgenie.cache_tier": cache_tier,
                                 "instgenie.template_id": request.template_id})
        sink = _Sink(asyncio.get_running_loop(), request.progress_interval_ms / 1000, engine=loop,
                     preview_every=max(0, int(request.preview_every_steps)), span=span)
        try:
            handle = loop.submit(edit, events=sink)
        except InstGenIEError:
            raise
        except ValueError as exc:  # the same request id is already running here
            raise ServiceError(grpc.StatusCode.ALREADY_EXISTS, str(exc), reason="REQUEST_IN_FLIGHT",
                               field="request_id") from None
        status, answered = "OK", False
        try:
            yield wpb.EditResponse(request_id=request.request_id, queued=wpb.EditResponse.Queued(position=0))
            async for event in self._events(handle, sink):
                yield event if event.request_id else _with_id(event, request.request_id, cache_tier)
            try:
                result = await asyncio.wrap_future(handle.future)
            except Exception as exc:  # noqa: BLE001 - the engine's outcome, mapped to its status
                raise _abort_status(exc) from None
            small = result.image.width * result.image.height <= INLINE_CODEC_PIXELS
            png = _png(result.image) if small else await self._run(_png, result.image)
            timing = handle.timing
            if self.metrics is not None and timing.queue_seconds is not None:
                self.metrics.queue.record(timing.queue_seconds, self.metrics.labels)
            answered = True  # the caller may close the stream as soon as it has the result
            yield wpb.EditResponse(request_id=request.request_id, result=wpb.EditResult(
                mime_type="image/png", image=png, steps=result.steps, mask_ratio=result.mask_ratio,
                degraded_reason=result.degraded or "", queue_seconds=timing.queue_seconds or 0.0,
                total_seconds=time.monotonic() - timing.submitted, worker_id=self.runtime.config.worker_id,
                seed=int(request.seed)))
        except BaseException as exc:
            if not answered:
                info = status_of(exc) if isinstance(exc, Exception) else None
                status = info.code.name if info is not None else "CANCELLED" if isinstance(
                    exc, (GeneratorExit, asyncio.CancelledError)) else "INTERNAL"
            # The caller left, or the edit failed: free the batch slot at the next step (a no-op when done).
            if not handle.future.done():
                loop.cancel(request.request_id)
            raise
        finally:
            if self.metrics is not None:
                self.metrics.edits.add(1, {**self.metrics.labels, "cache_tier": cache_tier, "status": status})

    async def _events(self, handle, sink: _Sink):
        """Engine events as EditResponses (request_id left empty: the caller fills it), until the end mark.

        While the request waits for a batch slot, a poller puts its queue position into the same queue (only
        when it changes).
        """
        poller = asyncio.get_running_loop().create_task(self._poll_position(handle.request_id, sink))
        try:
            while True:
                ev = await sink.queue.get()
                if ev is None:
                    return
                if isinstance(ev, int):
                    yield wpb.EditResponse(queued=wpb.EditResponse.Queued(position=ev))
                    continue
                preview = b""
                if isinstance(ev, _Stepped):
                    # Made on the codec pool: the denoising loop goes on; only this stream waits for it.
                    preview = await self._run(_preview_png, self.runtime.editor, *ev.snapshot)
                    ev = ev.event
                if ev.status == Status.RUNNING and ev.steps_done == 0:
                    poller.cancel()
                    yield wpb.EditResponse(started=wpb.EditResponse.Started(batch_size=ev.batch_size))
                elif ev.status in (Status.RUNNING, Status.FINISHED):  # FINISHED: the last step
                    yield wpb.EditResponse(progress=wpb.EditResponse.Progress(
                        step=ev.steps_done, total_steps=ev.total_steps, batch_size=ev.batch_size,
                        preview=preview, preview_mime_type="image/png" if preview else ""))
                # cancelled, expired or failed: the future carries the outcome
        finally:
            poller.cancel()

    async def _poll_position(self, request_id: str, sink: _Sink) -> None:
        position = 0
        while True:
            await asyncio.sleep(QUEUE_POLL_SECONDS)
            now = self._queue_position(request_id)
            if now and now != position:
                position = now
                sink.queue.put_nowait(now)

    def _queue_position(self, request_id: str) -> int:
        for i, r in enumerate(self.runtime.loop.snapshot().waiting):
            if r.request_id == request_id:
                return i + 1
        return 0

    def _decode_mask(self, data: bytes):
        if not data:
            raise invalid("mask", "mask is empty: send a PNG of the template's size, white = edit")
        return mask_from_image(decode_image(data, self.limits, field="mask"), None)

    @rpc
    async def CancelEdit(self, request, context):
        request_id_var.set(request.request_id or "-")
        if self.runtime.loop is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"no edit {request.request_id!r} here",
                               reason="REQUEST_NOT_FOUND", field="request_id")
        outcome = self.runtime.loop.cancel(request.request_id)
        name = getattr(outcome, "name", "CANCELLED" if outcome else "NOT_FOUND")
        if name == "NOT_FOUND":
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"no edit {request.request_id!r} in flight on this worker",
                               reason="REQUEST_NOT_FOUND", field="request_id")
        value = wpb.CANCEL_OUTCOME_CANCELLED if name == "CANCELLED" else wpb.CANCEL_OUTCOME_ALREADY_FINISHED
        return wpb.CancelEditResponse(outcome=value)

    # ------------------------------------------------------------------------------ registration
    @rpc
    async def RegisterTemplate(self, request, context):
        request_id_var.set(request.template_id or "-")
        self._check_accepting()
        image = await self._run(lambda: decode_image(request.image, self.limits, field="image"))
        aio_loop = asyncio.get_running_loop()
        progress_q: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def progress(done: int, total: int) -> None:
            if cancelled.is_set():
                raise _Cancelled("registration cancelled by its caller")
            aio_loop.call_soon_threadsafe(progress_q.put_nowait, (done, total))

        def register():
            return self.runtime.editor.register_template(
                image, request.prompt, steps=int(request.steps) or None, seed=int(request.seed),
                mode=request.cache_mode or None,  # none asked: the model family's default
                guidance_scale=request.guidance_scale if request.HasField("guidance_scale") else None,
                template_id=request.template_id or None, progress=progress)

        self.registrations += 1
        future = aio_loop.run_in_executor(self._registrar, register)
        try:
            while not future.done() or not progress_q.empty():
                getter = asyncio.ensure_future(progress_q.get())
                await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    done, total = getter.result()
                    yield wpb.RegisterTemplateResponse(progress=wpb.RegisterTemplateResponse.Progress(
                        step=done, total_steps=total))
                else:
                    getter.cancel()
            manifest = await future
            self.runtime.store.forget(manifest.template_id)  # a re-registration replaces what we memoised
            self.runtime.editor.cache.forget(manifest.template_id)
            yield wpb.RegisterTemplateResponse(registered=wpb.RegisterTemplateResponse.Registered(
                template_id=manifest.template_id, steps=manifest.steps,
                cache_bytes=sum(int(s["bytes"]) for s in manifest.shards.values()), model_id=manifest.model_id))
        finally:
            cancelled.set()
            self.registrations -= 1

    # ----------------------------------------------------------------------------- cache control
    @rpc
    async def WarmTemplate(self, request, context):
        self._check_accepting()
        await self._run(self.runtime.editor.prefetch, request.template_id)
        return wpb.WarmTemplateResponse()

    @rpc
    async def ForgetTemplate(self, request, context):
        if self.runtime.ready.is_set():
            self.runtime.editor.cache.forget(request.template_id)
            self.runtime.store.forget(request.template_id)
        return wpb.ForgetTemplateResponse()

    @rpc
    async def GetStatus(self, request, context):
        if not self.runtime.ready.is_set():
            self._check_accepting()
        return wpb.GetStatusResponse(
            worker_id=self.runtime.config.worker_id, model=self.runtime.model_info(),
            load=self.runtime.load_report(draining=self.draining, registrations=self.registrations),
            max_batch_size=self.runtime.config.max_batch_size)

    # --------------------------------------------------------------------------------------- drain
    async def drain(self, timeout: float) -> None:
        """Refuse new work, let running edits and registrations finish (bounded by `timeout`)."""
        self.draining = True
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            busy = (self.runtime.loop.in_flight() if self.runtime.loop else 0) + self.registrations
            if not busy:
                return
            await asyncio.sleep(0.05)
        log.warning("drain timed out after %.0fs with work left; it is cancelled", timeout)

    def close(self) -> None:
        self._registrar.shutdown(wait=False, cancel_futures=True)
        self._codec.shutdown(wait=False, cancel_futures=True)


def _with_id(event: wpb.EditResponse, request_id: str, cache_tier: str) -> wpb.EditResponse:
    event.request_id = request_id
    if event.WhichOneof("event") == "started":
        event.started.cache_tier = cache_tier
    return event


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


#: previews are at most this many pixels a side
PREVIEW_MAX_SIDE = 256


def _preview_png(editor, state, inputs) -> bytes:
    """What the edit would look like if denoising stopped now, as a small PNG ("" when it cannot be made).

    The model family's estimate of the clean latents (`Editor.preview_latents`: rectified flow's for Flux, the
    scheduler's x0 prediction from epsilon for a UNet) is decoded like a result (template pixels outside the
    mask), then shrunk.
    """
    try:
        import torch

        from instgenie.engine.latents import tensor_to_image

        with torch.no_grad():
            decoded = editor.model.codec.decode(editor.preview_latents(state, inputs))
            mask = state.mask.pixels.to(decoded.device)[None, None]
            decoded = torch.where(mask, decoded, state.template_image.to(decoded.dtype))
            image = tensor_to_image(decoded)
        if max(image.size) > PREVIEW_MAX_SIDE:
            image.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE))
        return _png(image)
    except Exception:  # noqa: BLE001 - a preview is optional; the edit must never fail for one
        log.debug("preview failed", exc_info=True)
        return b""


def _abort_status(exc: BaseException) -> BaseException:
    """The engine's outcome as an exception the @rpc decorator turns into the right status."""
    status = getattr(exc, "status", None)
    if status in _ABORT_CODES:
        code, reason = _ABORT_CODES[status]
        message = str(exc) or status.value
        if status == Status.FAILED:
            message = f"the edit failed during a denoising step: {message}"
        return ServiceError(code, message, reason=reason)
    return exc
