"""The public EditService: authentication, validation, template records and operations, edits via the scheduler.

The gateway keeps no state that another replica would need: template records live in the object store, and
an edit's idempotency, admission and placement live in the scheduler. What it does keep (a few seconds of
template records and the model catalogue, the registrations it drives) is a cache or dies with its caller.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import hashlib
import logging
import math
import secrets
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field

import grpc
from google.longrunning import operations_pb2
from google.rpc import status_pb2

from instgenie.gateway.v1 import edit_service_pb2 as pb
from instgenie.gateway.v1 import edit_service_pb2_grpc as pb_grpc
from instgenie.scheduler.v1 import scheduler_service_pb2 as spb
from instgenie.scheduler.v1 import scheduler_service_pb2_grpc as spb_grpc
from instgenie.status import parse_rpc_error
from instgenie.worker.v1 import worker_service_pb2 as wpb

from ..common.logs import request_id_var
from ..common.objectstore import StoreUnavailable
from ..common.server import channel_options
from ..common.status import ServiceError, invalid, rpc, status_of
from ..common.telemetry import end_stream, meter
from . import validation as v
from .auth import ApiKeys, Tenant
from .templates import CREATING, FAILED, READY, TemplateRecord, TemplateRecords, content_hash, \
    decode_page_token, encode_page_token, new_template_id

log = logging.getLogger(__name__)

NOT_FOUND, PRECONDITION = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION
#: masks up to this size are decoded on the event loop (well under a millisecond), bigger ones in the pool
INLINE_DECODE_BYTES = 16 * 1024
#: a unary edit shows no progress: the worker reports steps this rarely (enough for the scheduler's view of load)
UNARY_PROGRESS_MS = 100
#: "" = the model's default mode (the first it announces)
_CACHE_MODES = {pb.CACHE_MODE_UNSPECIFIED: "", pb.CACHE_MODE_KV: "kv", pb.CACHE_MODE_Y: "y", pb.CACHE_MODE_O: "o"}


@dataclass
class GatewayConfig:
    scheduler: str
    limits: v.Limits = field(default_factory=v.Limits)
    #: when a call carries no deadline
    default_edit_deadline: float = 300.0
    default_create_deadline: float = 1800.0
    #: StreamEdit sends a keepalive after this many seconds without an event
    keepalive_seconds: float = 5.0
    #: how long READY template records and the model catalogue are reused before re-reading them
    record_ttl: float = 5.0
    models_ttl: float = 2.0
    #: how often WaitOperation/WatchOperation re-read an operation another gateway drives
    poll_seconds: float = 0.5


def worker_request_id(tenant: str, request_id: str) -> str:
    """The id an edit carries inside the mesh: tenant-scoped, so two tenants may pick the same request id."""
    scoped = f"{tenant}-{request_id}"
    return scoped if len(scoped) <= 128 else f"{tenant}-{hashlib.sha256(request_id.encode()).hexdigest()[:40]}"


class GatewayService(pb_grpc.EditServiceServicer):
    def __init__(self, config: GatewayConfig, keys: ApiKeys, records: TemplateRecords):
        self.config = config
        self.keys = keys
        self.records = records
        self._io = cf.ThreadPoolExecutor(16, thread_name_prefix="instgenie-gw-io")
        self._channel = grpc.aio.insecure_channel(config.scheduler, options=channel_options())
        self.scheduler = spb_grpc.SchedulerServiceStub(self._channel)
        self._models: dict[str, wpb.ModelInfo] = {}
        self._model_workers: dict[str, int] = {}
        self._models_at = 0.0
        self._record_cache: dict[tuple[str, str], tuple[TemplateRecord, float]] = {}
        self._driving: dict[str, asyncio.Task] = {}
        self._driving_records: dict[str, TemplateRecord] = {}
        self._changed: dict[str, asyncio.Event] = {}
        m = meter()
        self._requests = m.create_counter(
            "instgenie_requests", description="Edits answered by the gateway, by model, method and gRPC status")
        self._e2e = m.create_histogram("instgenie_request_e2e_seconds", unit="s",
                                       description="Edits: arrival at the gateway until the result (successful ones)")
        self._mask_ratio = m.create_histogram(
            "instgenie_request_mask_ratio", description="Edits: share of the image's tokens under the mask")
        self._in_flight = m.create_up_down_counter("instgenie_gateway_edits_in_flight",
                                                   description="Edits this gateway is answering now")

    async def close(self) -> None:
        for task in list(self._driving.values()):
            task.cancel()
        if self._driving:
            await asyncio.gather(*self._driving.values(), return_exceptions=True)
        await self._channel.close()
        self._io.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------------ helpers
    def _tenant(self, context) -> Tenant:
        return self.keys.authenticate(context.invocation_metadata())

    async def _io_call(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._io, lambda: fn(*args, **kwargs))

    async def models(self, refresh: bool = False) -> dict[str, wpb.ModelInfo]:
        if refresh or time.monotonic() - self._models_at > self.config.models_ttl:
            resp = await self.scheduler.ListModels(spb.ListModelsRequest(), timeout=5.0)
            self._models = {m.model.model_id: m.model for m in resp.models}
            self._model_workers = {m.model.model_id: m.workers for m in resp.models}
            self._models_at = time.monotonic()
        return self._models

    async def _model(self, model_id: str) -> wpb.ModelInfo:
        models = await self.models()
        if model_id not in models:
            models = await self.models(refresh=True)
        if model_id not in models:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"no worker serves model {model_id!r} right now; retry "
                               "when one has started", reason="NO_WORKER", retry_after=2.0)
        return models[model_id]

    async def _record(self, tenant: Tenant, template_id: str, *, fresh: bool = False) -> TemplateRecord:
        key = (tenant.name, template_id)
        driven = self._driving_records.get(template_id)
        if driven is not None and driven.tenant == tenant.name:
            return driven  # this gateway drives its registration: the live record, no store round trip
        cached = self._record_cache.get(key)
        if cached and not fresh and time.monotonic() - cached[1] < self.config.record_ttl:
            return cached[0]
        try:
            record = await self._io_call(self.records.get, tenant.name, template_id,
                                         driven_here=template_id in self._driving)
        except StoreUnavailable:
            if cached and cached[0].state == READY and not fresh:
                # A READY record changes only by deletion: while the store is down, edits of templates this
                # gateway has seen go on (workers hold their caches in host memory).
                return cached[0]
            raise
        if record is None:
            self._record_cache.pop(key, None)
            # The same answer whether the id never existed or belongs to another tenant: no existence leak.
            raise ServiceError(NOT_FOUND, f"template {template_id!r} not found", reason="TEMPLATE_NOT_FOUND",
                               field="template_id")
        if record.state == READY:
            if len(self._record_cache) > 10_000:
                self._record_cache.clear()
            self._record_cache[key] = (record, time.monotonic())
        return record

    def _notify(self, template_id: str) -> None:
        event = self._changed.pop(template_id, None)
        if event is not None:
            event.set()

    def _remaining(self, context, default: float) -> float:
        remaining = context.time_remaining()
        return default if remaining is None else remaining

    # ---------------------------------------------------------------------------------- templates
    @rpc
    async def CreateTemplate(self, request, context):
        tenant = self._tenant(context)
        request_id_var.set(request.request_id or "-")
        limits = self.config.limits
        v.check_request_id(request.request_id)
        v.check_text(request.prompt, "prompt", limits.max_prompt_chars)
        v.check_text(request.name, "name", limits.max_name_chars)
        v.check_seed(request.seed)
        guidance = request.guidance_scale if request.HasField("guidance_scale") else None
        v.check_guidance(guidance, limits)
        if request.cache_mode not in _CACHE_MODES:
            raise invalid("cache_mode", f"unknown cache_mode {request.cache_mode}; use CACHE_MODE_KV, CACHE_MODE_Y "
                          "(Flux models) or CACHE_MODE_O (UNet models)")
        if request.request_id:
            existing = await self._io_call(self.records.template_for_request, tenant.name, request.request_id)
            if existing is not None:
                record = await self._io_call(self.records.get, tenant.name, existing,
                                             driven_here=existing in self._driving)
                if record is not None:
                    return pb.CreateTemplateResponse(operation=self._operation(record))
        image = await self._io_call(v.check_image, request.image, limits)
        width, height = image.size
        model = await self._choose_model(request.model, width, height)
        tenant.check_model(model.model_id)
        v.check_steps(request.steps, model.max_steps)
        modes = list(model.cache_modes) or ["kv", "y"]  # a worker of before cache_modes serves Flux
        mode = _CACHE_MODES[request.cache_mode] or modes[0]
        if mode not in modes:
            raise invalid("cache_mode", f"model {model.model_id!r} records cache modes {', '.join(modes)}, not "
                          f"{mode!r}; leave cache_mode unset for the model's default")
        now = time.time()
        record = TemplateRecord(
            template_id=new_template_id(), tenant=tenant.name, name=request.name, state=CREATING,
            model=model.model_id, width=width, height=height, steps=request.steps or model.default_steps,
            prompt=request.prompt, cache_mode=mode, seed=int(request.seed),
            guidance_scale=guidance, create_time=now, update_time=now, request_id=request.request_id,
            extra={"content_sha256": await self._io_call(content_hash, image)})
        await self._io_call(self.records.put, record)
        await self._io_call(self.records.remember_content, record, request.image)
        if request.request_id:
            await self._io_call(self.records.remember_request, tenant.name, request.request_id, record.template_id)
        task = asyncio.get_running_loop().create_task(
            self._drive_registration(record, request.image, v.template_tokens(model, width, height)))
        self._driving[record.template_id] = task
        self._driving_records[record.template_id] = record

        def done(_):
            self._driving.pop(record.template_id, None)
            self._driving_records.pop(record.template_id, None)
        task.add_done_callback(done)
        log.info("template %s (%dx%d, model %s) registering for tenant %s", record.template_id, width, height,
                 model.model_id, tenant.name)
        return pb.CreateTemplateResponse(operation=self._operation(record))

    async def _choose_model(self, requested: str, width: int, height: int) -> wpb.ModelInfo:
        models = await self.models(refresh=True)
        if requested:
            if requested not in models:
                raise invalid("model", f"model {requested!r} is not served here; served: {sorted(models) or 'none'}")
            candidates = [models[requested]]
        else:
            candidates = list(models.values())
        if not models:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "no worker is serving any model right now; retry when "
                               "one has started", reason="NO_WORKER", retry_after=2.0)
        # A model whose default size this is wins; else the model on whose token grid the image lies (a template
        # keeps its own size: the engine batches sizes apart and caches per template) and whose default size is
        # nearest in pixels: a 16 px digits model could take a 512x512 photo, but it is not what the user meant.
        fits = [m for m in candidates if (m.width, m.height) == (width, height)]
        if not fits:
            on_grid = [m for m in candidates if m.cell and width % m.cell == 0 and height % m.cell == 0]
            fits = sorted(on_grid, key=lambda m: abs(math.log(width * height / (m.width * m.height))))[:1]
        if not fits:
            sizes = ", ".join(f"{m.model_id} (sides multiples of {m.cell} px)" if m.cell else
                              f"{m.model_id} at {m.width}x{m.height}" for m in candidates)
            raise invalid("image", f"image is {width}x{height}, a size no model serves here: {sizes}; crop or resize "
                          "it")
        return sorted(fits, key=lambda m: m.model_id)[0]

    async def _drive_registration(self, record: TemplateRecord, image: bytes, image_tokens: int) -> None:
        request_id_var.set(record.template_id)
        reg = wpb.RegisterTemplateRequest(template_id=record.template_id, image=image, prompt=record.prompt,
                                          steps=record.steps, seed=record.seed, cache_mode=record.cache_mode)
        if record.guidance_scale is not None:
            reg.guidance_scale = record.guidance_scale
        last_saved = 0.0
        try:
            call = self.scheduler.RegisterTemplate(
                spb.RegisterTemplateRequest(registration=reg, tenant=record.tenant, model=record.model,
                                            image_tokens=image_tokens),
                timeout=self.config.default_create_deadline)
            async for msg in call:
                if msg.WhichOneof("event") != "worker_event":
                    continue
                ev = msg.worker_event
                if ev.WhichOneof("event") == "progress":
                    record.steps_done = ev.progress.step
                    self._notify(record.template_id)
                    if time.monotonic() - last_saved > 1.0:  # also the heartbeat other gateways read
                        await self._io_call(self.records.put, record)
                        last_saved = time.monotonic()
                elif ev.WhichOneof("event") == "registered":
                    record.state, record.steps_done = READY, record.steps
                    record.cache_bytes = int(ev.registered.cache_bytes)
                    await end_stream(call)
                    break
            else:
                record.state, record.error_code = FAILED, "INTERNAL"
                record.error = "the registration stream ended without a result"
        except grpc.aio.AioRpcError as exc:
            info = parse_rpc_error(exc)
            record.state, record.error_code, record.error = FAILED, info.code.name, info.message
        except asyncio.CancelledError:
            record.state, record.error_code = FAILED, "UNAVAILABLE"
            record.error = "registration was cancelled because the gateway shut down; create the template again"
        except Exception as exc:  # noqa: BLE001 - record what happened; the operation must end
            log.exception("registration of %s failed", record.template_id)
            record.state, record.error_code, record.error = FAILED, "INTERNAL", f"gateway error: {type(exc).__name__}"
        try:
            await self._io_call(self.records.put, record)
        except Exception:  # noqa: BLE001 - readers settle a stale record later
            log.exception("could not store the final state of %s", record.template_id)
        log.info("template %s %s%s", record.template_id, record.state.lower(),
                 f": {record.error}" if record.error else "")
        self._notify(record.template_id)

    def _operation(self, record: TemplateRecord) -> operations_pb2.Operation:
        op = operations_pb2.Operation(name=record.operation, done=record.done)
        meta = pb.CreateTemplateMetadata(template_id=record.template_id, state=record.to_proto().state,
                                         steps_done=record.steps_done, total_steps=record.steps)
        meta.create_time.FromNanoseconds(int(record.create_time * 1e9))
        meta.update_time.FromNanoseconds(int(record.update_time * 1e9))
        op.metadata.Pack(meta)
        if record.state == READY:
            op.response.Pack(record.to_proto())
        elif record.state == FAILED:
            code = grpc.StatusCode[record.error_code] if record.error_code in grpc.StatusCode.__members__ \
                else grpc.StatusCode.INTERNAL
            op.error.CopyFrom(status_pb2.Status(code=code.value[0], message=record.error))
        return op

    async def _op_record(self, tenant: Tenant, name: str) -> TemplateRecord:
        return await self._record(tenant, v.template_of_operation(name), fresh=True)

    @rpc
    async def GetOperation(self, request, context):
        tenant = self._tenant(context)
        return pb.GetOperationResponse(operation=self._operation(await self._op_record(tenant, request.name)))

    async def _next_change(self, template_id: str, timeout: float) -> None:
        """Until the operation changes here, or a poll interval passes (another gateway may drive it)."""
        event = self._changed.setdefault(template_id, asyncio.Event())
        wait = self.config.poll_seconds if template_id not in self._driving else timeout
        try:
            await asyncio.wait_for(event.wait(), max(0.0, min(wait, timeout)))
        except asyncio.TimeoutError:
            pass

    @rpc
    async def WaitOperation(self, request, context):
        tenant = self._tenant(context)
        remaining = self._remaining(context, self.config.default_create_deadline)
        if request.HasField("timeout"):
            remaining = min(remaining, request.timeout.ToNanoseconds() / 1e9)
        end = time.monotonic() + max(0.0, remaining - 0.05)  # answer just before the caller's deadline
        record = await self._op_record(tenant, request.name)
        while not record.done and time.monotonic() < end:
            await self._next_change(record.template_id, end - time.monotonic())
            record = await self._op_record(tenant, request.name)
        return pb.WaitOperationResponse(operation=self._operation(record))

    @rpc
    async def WatchOperation(self, request, context):
        tenant = self._tenant(context)
        record = await self._op_record(tenant, request.name)
        seen = None
        while True:
            state = (record.state, record.steps_done)
            if state != seen:
                seen = state
                yield pb.WatchOperationResponse(operation=self._operation(record))
            if record.done:
                return
            await self._next_change(record.template_id, self.config.keepalive_seconds)
            record = await self._op_record(tenant, request.name)

    @rpc
    async def GetTemplate(self, request, context):
        tenant = self._tenant(context)
        v.check_template_id(request.template_id)
        record = await self._record(tenant, request.template_id, fresh=True)
        return pb.GetTemplateResponse(template=record.to_proto())

    @rpc
    async def ListTemplates(self, request, context):
        tenant = self._tenant(context)
        size = v.check_page(request.page_size, self.config.limits)
        after = None
        if request.page_token:
            after = decode_page_token(request.page_token)
            if after is None:
                raise invalid("page_token", "page_token is not one this API issued; pass next_page_token from "
                              "the previous response, or nothing for the first page")
        ids, more = await self._io_call(self.records.list_ids, tenant.name, after, size)
        records = await asyncio.gather(*(self._io_call(self.records.get, tenant.name, tid,
                                                       driven_here=tid in self._driving) for tid in ids))
        resp = pb.ListTemplatesResponse(templates=[r.to_proto() for r in records if r is not None])
        if more and ids:
            resp.next_page_token = encode_page_token(ids[-1])
        return resp

    @rpc
    async def DeleteTemplate(self, request, context):
        tenant = self._tenant(context)
        v.check_template_id(request.template_id)
        record = await self._record(tenant, request.template_id, fresh=True)
        if record.state == CREATING:
            raise ServiceError(PRECONDITION, f"template {record.template_id!r} is still being created (step "
                               f"{record.steps_done}/{record.steps}); delete it once its operation is done",
                               reason="TEMPLATE_CREATING")
        await self._io_call(self.records.delete, record)
        self._record_cache.pop((tenant.name, record.template_id), None)
        try:
            await self.scheduler.ForgetTemplate(spb.ForgetTemplateRequest(template_id=record.template_id),
                                                timeout=5.0)
        except grpc.aio.AioRpcError as exc:  # workers drop it from host memory by LRU anyway
            log.warning("scheduler could not tell workers to forget %s: %s", record.template_id, exc.code().name)
        log.info("template %s deleted", record.template_id)
        return pb.DeleteTemplateResponse()

    # -------------------------------------------------------------------------------------- edits
    async def _prepare_edit(self, tenant: Tenant, e: pb.EditRequest) -> tuple[spb.EditRequest, TemplateRecord]:
        limits = self.config.limits
        v.check_request_id(e.request_id)
        v.check_template_id(e.template_id)
        v.check_text(e.prompt, "prompt", limits.max_prompt_chars)
        if e.HasField("seed"):
            v.check_seed(e.seed)
        guidance = e.guidance_scale if e.HasField("guidance_scale") else None
        v.check_guidance(guidance, limits)
        v.check_dilate(e.dilate, limits)
        if e.preview_every_steps < 0:
            raise invalid("preview_every_steps", f"preview_every_steps must be 0 (none) or a step count, got "
                          f"{e.preview_every_steps}")
        if len(e.mask) > limits.image.max_bytes:
            raise invalid("mask", f"mask is {len(e.mask)} bytes; at most {limits.image.max_bytes} are accepted",
                          reason="IMAGE_TOO_LARGE")
        record = await self._record(tenant, e.template_id)
        if record.state == CREATING:
            raise ServiceError(PRECONDITION, f"template {record.template_id!r} is still being created (step "
                               f"{record.steps_done}/{record.steps}); wait for operation {record.operation}",
                               reason="TEMPLATE_CREATING")
        if record.state == FAILED:
            raise ServiceError(PRECONDITION, f"template {record.template_id!r} failed to register ({record.error}); "
                               "delete it and create it again", reason="TEMPLATE_FAILED")
        if e.steps and e.steps != record.steps:
            raise invalid("steps", f"template {record.template_id!r} was registered with {record.steps} steps; edits "
                          f"run that many (send 0 or {record.steps}), got {e.steps}")
        model = await self._model(record.model)
        check = (v.check_mask, e.mask, record.width, record.height, model.scale_factor, e.dilate, limits,
                 v.token_pack(model))
        # A small mask decodes faster than a hop to the thread pool; a big one must not stall the event loop.
        _, tokens = check[0](*check[1:]) if len(e.mask) <= INLINE_DECODE_BYTES else await self._io_call(*check)
        seed = e.seed if e.HasField("seed") else secrets.randbelow(2 ** 31)
        job = wpb.EditRequest(request_id=worker_request_id(tenant.name, e.request_id), template_id=e.template_id,
                              mask=e.mask, prompt=e.prompt, seed=seed, steps=record.steps, dilate=e.dilate,
                              tenant=tenant.name, preview_every_steps=min(e.preview_every_steps, record.steps))
        if guidance is not None:
            job.guidance_scale = guidance
        # The cost model prices the edit at its template's size and cache mode, not the model's defaults.
        return spb.EditRequest(edit=job, tenant=tenant.name, model=record.model, masked_tokens=tokens,
                               cache_bytes=record.cache_bytes, steps=record.steps,
                               tenant_max_in_flight=tenant.max_in_flight, cache_mode=record.cache_mode,
                               image_tokens=v.template_tokens(model, record.width, record.height)), record

    async def _scheduler_messages(self, call, keepalive: float | None):
        """The scheduler's messages, with None inserted after `keepalive` seconds without one (streams only)."""
        if keepalive is None:  # unary: no queue, no timers on the hot path
            try:
                async for msg in call:
                    yield msg
            except grpc.aio.AioRpcError as exc:
                raise ServiceError.of(parse_rpc_error(exc)) from None
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump():
            try:
                async for msg in call:
                    queue.put_nowait(msg)
                queue.put_nowait(done)
            except grpc.aio.AioRpcError as exc:
                queue.put_nowait(exc)

        reader = asyncio.get_running_loop().create_task(pump())
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(queue.get(), keepalive)
                except asyncio.TimeoutError:
                    yield None
                    continue
                if msg is done:
                    return
                if isinstance(msg, grpc.aio.AioRpcError):
                    raise ServiceError.of(parse_rpc_error(msg))
                yield msg
        finally:
            reader.cancel()

    async def _edit_events(self, e: pb.EditRequest, context, stream: bool):
        """The public event stream of one edit (keepalives and every step when `stream`); raises on failure."""
        started = time.monotonic()
        labels = {"model": "unknown", "method": "StreamEdit" if stream else "Edit", "status": "OK"}
        self._in_flight.add(1)
        answered = False
        try:
            # aclosing: closing this stream cancels the scheduler call at once, not at garbage collection
            async with aclosing(self._edit_stream(e, context, stream, started, labels)) as events:
                async for event in events:
                    if event.WhichOneof("event") == "result":
                        answered = True
                        self._e2e.record(time.monotonic() - started, {"model": labels["model"]})
                        self._mask_ratio.record(event.result.mask_ratio, {"model": labels["model"]})
                    yield event
        except BaseException as exc:
            if not answered:
                info = status_of(exc) if isinstance(exc, Exception) else None
                labels["status"] = info.code.name if info is not None else \
                    "CANCELLED" if isinstance(exc, (GeneratorExit, asyncio.CancelledError)) else "INTERNAL"
            raise
        finally:
            self._in_flight.add(-1)
            self._requests.add(1, labels)

    async def _edit_stream(self, e: pb.EditRequest, context, stream: bool, started: float, labels: dict):
        tenant = self._tenant(context)
        if not e.request_id:
            e.request_id = uuid.uuid4().hex
        request_id_var.set(e.request_id)
        request, record = await self._prepare_edit(tenant, e)
        labels["model"] = record.model
        if not stream:
            request.edit.progress_interval_ms = UNARY_PROGRESS_MS
            request.edit.preview_every_steps = 0  # nobody would see them
        remaining = self._remaining(context, self.config.default_edit_deadline)
        call = self.scheduler.Edit(request, timeout=remaining)
        worker, rid = "", e.request_id
        try:
            async for msg in self._scheduler_messages(call, self.config.keepalive_seconds if stream else None):
                if msg is None:
                    yield pb.StreamEditResponse(request_id=rid, keepalive=pb.StreamEditResponse.Keepalive())
                    continue
                if msg.WhichOneof("event") == "placement":
                    worker = msg.placement.worker_id
                    if msg.placement.attempt == 1:
                        yield pb.StreamEditResponse(request_id=rid, accepted=pb.StreamEditResponse.Accepted(
                            predicted_seconds=msg.placement.predicted_seconds))
                    continue
                ev = msg.worker_event
                kind = ev.WhichOneof("event")
                if kind == "queued":
                    yield pb.StreamEditResponse(request_id=rid, queued=pb.StreamEditResponse.Queued(
                        position=ev.queued.position))
                elif kind == "started":
                    yield pb.StreamEditResponse(request_id=rid, started=pb.StreamEditResponse.Started(
                        worker=worker, batch_size=ev.started.batch_size, cache_tier=ev.started.cache_tier))
                elif kind == "progress":
                    yield pb.StreamEditResponse(request_id=rid, progress=pb.StreamEditResponse.Progress(
                        step=ev.progress.step, total_steps=ev.progress.total_steps,
                        batch_size=ev.progress.batch_size, preview=ev.progress.preview,
                        preview_mime_type=ev.progress.preview_mime_type))
                elif kind == "result":
                    r = ev.result
                    yield pb.StreamEditResponse(request_id=rid, result=pb.EditResult(
                        request_id=rid, template_id=record.template_id, mime_type=r.mime_type, image=r.image,
                        seed=r.seed, steps=r.steps, mask_ratio=r.mask_ratio, degraded_reason=r.degraded_reason,
                        queue_seconds=r.queue_seconds, total_seconds=time.monotonic() - started,
                        worker=r.worker_id or worker))
                    return
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the edit ended without a result", reason="NO_RESULT")
        finally:
            await end_stream(call)

    @rpc
    async def StreamEdit(self, request, context):
        # aclosing: a client that leaves closes this stream, and the edit's scheduler call with it, at once.
        async with aclosing(self._edit_events(request.edit, context, stream=True)) as events:
            async for event in events:
                yield event

    @rpc
    async def Edit(self, request, context):
        async with aclosing(self._edit_events(request, context, stream=False)) as events:
            async for event in events:
                if event.WhichOneof("event") == "result":
                    return pb.EditResponse(result=event.result)
        raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the edit ended without a result", reason="NO_RESULT")

    @rpc
    async def CancelEdit(self, request, context):
        tenant = self._tenant(context)
        if not request.request_id:
            raise invalid("request_id", "request_id is required: the id the edit was sent with")
        v.check_request_id(request.request_id)
        request_id_var.set(request.request_id)
        resp = await self.scheduler.CancelEdit(spb.CancelEditRequest(
            tenant=tenant.name, request_id=worker_request_id(tenant.name, request.request_id)),
            timeout=self._remaining(context, 10.0))
        outcome = {wpb.CANCEL_OUTCOME_CANCELLED: pb.CANCEL_OUTCOME_CANCELLED,
                   wpb.CANCEL_OUTCOME_ALREADY_FINISHED: pb.CANCEL_OUTCOME_ALREADY_FINISHED}[resp.outcome]
        return pb.CancelEditResponse(outcome=outcome)

    @rpc
    async def ListModels(self, request, context):
        self._tenant(context)
        models = await self.models(refresh=True)
        return pb.ListModelsResponse(models=[pb.Model(
            name=m.model_id, width=m.width, height=m.height, default_steps=m.default_steps, max_steps=m.max_steps,
            guidance=m.guidance, default_guidance_scale=m.default_guidance_scale,
            workers=self._model_workers.get(m.model_id, 0)) for m in sorted(models.values(), key=lambda m: m.model_id)])
