"""POST /v1/images/edits: OpenAI's image edit on InstGenIE templates, found by content hash, optionally streamed.

Which template an edit runs on (reported as `instgenie.template_source` and the `x-instgenie-template-source`
header): `template_id` when the caller names one; `content_hash` when the image is (pixel for pixel) one
the tenant registered before on the same model, whose cache is used; `registered` when it is new: it is
registered as a template on the fly (a full run, so the first call is slower) and edited from its cache;
every later call with the same image finds it by content. See docs/http.md.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from instgenie.gateway.v1 import edit_service_pb2 as pb

from .. import validation as v
from ..templates import CREATING, FAILED, READY, TemplateRecord, content_hash
from .bridge import Bridge, HttpCall, answering, api_error
from .errors import ApiError, bad
from .forms import Fields, Upload, read_form
from .masks import edit_region, engine_mask_png, fit, has_transparency, parse_size, png
from .results import ResultLinks

log = logging.getLogger(__name__)

#: OpenAI parameters accepted for compatibility that change nothing here (PNG at the model's resolution)
IGNORED = {"background", "quality", "input_fidelity", "output_compression", "moderation"}
KNOWN = {"image", "image[]", "mask", "prompt", "n", "size", "response_format", "output_format", "stream",
         "partial_images", "user", "safety_identifier", "model", "seed", "steps", "template_id", "dilate",
         "guidance_scale", "request_id"} | IGNORED
MAX_N = 10


@dataclass
class EditParams:
    prompt: str
    n: int
    size: tuple[int, int] | None
    response_format: str
    stream: bool
    partial_images: int
    user: str | None
    model: str
    seed: int | None
    steps: int
    template_id: str | None
    dilate: int
    guidance_scale: float | None
    request_id: str
    image: Upload | None
    mask: Upload | None


async def parse_params(form, max_image_bytes: int, max_prompt_chars: int) -> EditParams:
    f = Fields(form, KNOWN)
    p = EditParams(
        prompt=f.text("prompt", max_chars=max_prompt_chars) or "",
        n=f.integer("n", 1, MAX_N) or 1,
        size=parse_size(f.text("size")),
        response_format=f.choice("response_format", ("b64_json", "url"), "b64_json"),
        stream=f.boolean("stream"),
        partial_images=f.integer("partial_images", 0, 1000) or 0,
        user=f.text("safety_identifier", max_chars=256) or f.text("user", max_chars=256),
        model=f.text("model", max_chars=128) or "",
        seed=f.integer("seed", 0, v.MAX_SEED),
        steps=f.integer("steps", 0, 10_000) or 0,
        template_id=f.text("template_id", max_chars=64),
        dilate=f.integer("dilate", 0, 1_000) or 0,
        guidance_scale=f.number("guidance_scale", 0.0, 1e6),
        request_id=f.text("request_id", max_chars=128) or uuid.uuid4().hex,
        image=await f.file("image", "image[]", max_bytes=max_image_bytes),
        mask=await f.file("mask", max_bytes=max_image_bytes),
    )
    f.choice("output_format", ("png",))
    if form.get("prompt") is None:
        raise bad("prompt", "prompt is required", code="missing_required_parameter")
    if p.stream and p.n != 1:
        raise bad("n", "stream=true edits one image: send n=1 (or stream=false for n > 1)")
    v.check_request_id(p.request_id)  # the gateway's own rule (raises its INVALID_ARGUMENT)
    return p


@dataclass
class Target:
    """What an edit runs on: the template, the engine-convention mask, and how the template was found."""

    record: TemplateRecord
    mask: bytes
    source: str  # template_id | content_hash | registered
    registration_seconds: float = 0.0
    extra: dict = field(default_factory=dict)


class ImageEdits:
    def __init__(self, bridge: Bridge, results: ResultLinks):
        self.bridge = bridge
        self.results = results
        self._registering: dict[tuple[str, str, str], asyncio.Task] = {}

    @property
    def limits(self):
        return self.bridge.service.config.limits

    # ------------------------------------------------------------------------------------- route
    async def handle(self, request: Request):
        config = self.bridge.service.config
        call = HttpCall(request.headers.get("authorization", ""), timeout=config.default_edit_deadline)
        async with answering():
            tenant = self.bridge.tenant(call)  # before reading an upload from an unknown caller
        max_image = self.limits.image.max_bytes
        form = await read_form(request, max_body=2 * max_image + 1024 * 1024)
        try:
            async with answering():
                p = await parse_params(form, max_image, self.limits.max_prompt_chars)
        finally:
            await form.close()
        target = await self.resolve(tenant, call, p)
        headers = {"x-instgenie-template-source": target.source,
                   "x-instgenie-template-id": target.record.template_id}
        if p.user:
            log.info("images/edits for end user %r on %s", p.user, target.record.template_id)
        if p.stream:
            return StreamingResponse(self._sse(request, call, tenant, p, target), media_type="text/event-stream",
                                     headers={**headers, "cache-control": "no-store"})
        results = await asyncio.gather(*(self._edit(call, p, target, i) for i in range(p.n)))
        data = [await self._image_item(request, tenant.name, p, r.image) for r in results]
        return JSONResponse({"created": int(time.time()), "data": data, **self._common(target),
                             "instgenie": self._report(target, results)}, headers=headers)

    # -------------------------------------------------------------------------- template and mask
    async def resolve(self, tenant, call: HttpCall, p: EditParams) -> Target:
        image = None
        if p.image is not None:
            image = await self.bridge.io(v.check_image, p.image.data, self.limits, "image")
        if p.template_id:
            async with answering():
                v.check_template_id(p.template_id)
            record = await self.bridge.record(tenant, p.template_id)
            size = (record.width, record.height)
            if p.size not in (None, size):
                raise bad("size", f"size must be the template's, {size[0]}x{size[1]}, or auto")
            if image is not None and image.size != size:
                raise bad("image", f"image is {image.size[0]}x{image.size[1]} but template {record.template_id} is "
                          f"{size[0]}x{size[1]}; send the template's image, or no image with template_id")
            return Target(record, await self._mask(p, image, size, size), "template_id")
        if image is None:
            raise bad("image", "image is required (or template_id, an InstGenIE extension)",
                      code="missing_required_parameter")
        served = [(m.width, m.height) for m in (await self.bridge.models()).values()]
        fitted = fit(image, p.size, served)
        mask = await self._mask(p, image, image.size, fitted.size)
        model = await self.bridge.choose_model(p.model, *fitted.size)
        async with answering():
            tenant.check_model(model.model_id)
        sha = await self.bridge.io(content_hash, fitted)
        record = await self._by_content(tenant, call, model.model_id, sha)
        if record is not None:
            return Target(record, mask, "content_hash")
        if p.steps not in (0, model.default_steps):
            # A new image is registered with the model's default steps, and an edit runs its template's steps.
            raise bad("steps", f"a new image is registered with {model.default_steps} steps, so edits of it run "
                      f"that many (send 0 or {model.default_steps}), got {p.steps}", code="invalid_argument")
        started = time.monotonic()
        image_bytes = p.image.data if fitted is image else png(fitted)
        record = await self._register(tenant, call, model.model_id, sha, image_bytes)
        return Target(record, mask, "registered", registration_seconds=time.monotonic() - started)

    async def _mask(self, p: EditParams, image, sent_size, run_size) -> bytes:
        """The engine's mask PNG, from `mask` or else the image's own transparency (OpenAI's fallback)."""
        if p.mask is not None:
            mask = await self.bridge.io(v.check_image, p.mask.data, self.limits, "mask")
            if mask.size != tuple(sent_size):
                raise bad("mask", f"mask is {mask.size[0]}x{mask.size[1]} but the image is {sent_size[0]}x"
                          f"{sent_size[1]}; send a mask of the image's size", code="invalid_mask_size")
        elif image is not None and has_transparency(image):
            mask = image
        else:
            raise bad("mask", "mask is required: an RGBA PNG of the image's size whose fully transparent pixels "
                      "mark the region to edit (or send an image with transparent pixels)",
                      code="missing_required_parameter")
        region = edit_region(mask, "mask" if p.mask is not None else "image")
        if tuple(run_size) != tuple(sent_size):
            region = resize_region(region, run_size)
        return engine_mask_png(region)

    async def _by_content(self, tenant, call: HttpCall, model: str, sha: str) -> TemplateRecord | None:
        """The tenant's template of this content on this model (waited for while it registers), else None."""
        template_id = await self.bridge.io(self.bridge.service.records.template_for_content, tenant.name, model, sha)
        if template_id is None:
            return None
        try:
            record = await self.bridge.record(tenant, template_id, fresh=True)
        except ApiError as err:
            if err.status == 404:
                return None
            raise
        if record.state == CREATING:
            record = await self._wait(tenant, call, record.template_id)
        return record if record.state == READY else None  # FAILED: it is registered again

    async def _register(self, tenant, call: HttpCall, model: str, sha: str, image: bytes):
        """Register the image, once per (tenant, model, content) in this gateway however many callers wait."""
        key = (tenant.name, model, sha)
        task = self._registering.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._create(tenant, call, model, sha, image))
            self._registering[key] = task
            task.add_done_callback(lambda _: self._registering.pop(key, None))
        return await asyncio.shield(task)  # a caller that leaves does not cancel the others' registration

    async def _create(self, tenant, call: HttpCall, model: str, sha: str, image: bytes):
        call = call.with_timeout(self.bridge.service.config.default_create_deadline)
        # What an uploaded image shows is unknown, so it is registered with the empty (unconditional) prompt;
        # edits bring their own prompt (the text is recomputed on every edit).
        request = pb.CreateTemplateRequest(image=image, name=f"upload {sha[:12]}", prompt="", model=model)
        op = (await self.bridge.unary("CreateTemplate", request, call)).operation
        meta = pb.CreateTemplateMetadata()
        op.metadata.Unpack(meta)
        log.info("images/edits: registering a new image (%s) as template %s", sha[:12], meta.template_id)
        record = await self._wait(tenant, call, meta.template_id)
        if record.state != READY:
            raise ApiError(400 if record.error_code == "INVALID_ARGUMENT" else 502,
                           f"registering the image as a template failed: {record.error}", param="image",
                           code="template_registration_failed")
        return record

    async def _wait(self, tenant, call: HttpCall, template_id: str) -> TemplateRecord:
        call = call.with_timeout(self.bridge.service.config.default_create_deadline)
        request = pb.WaitOperationRequest(name=f"operations/{template_id}")
        op = (await self.bridge.unary("WaitOperation", request, call)).operation
        if not op.done:
            raise ApiError(504, f"template {template_id} is still being registered; retry shortly",
                           code="template_creating")
        return await self.bridge.record(tenant, template_id, fresh=True)

    # ------------------------------------------------------------------------------------- edits
    def _request(self, p: EditParams, target: Target, index: int, preview_every: int = 0) -> pb.EditRequest:
        e = pb.EditRequest(template_id=target.record.template_id, mask=target.mask, prompt=p.prompt,
                           steps=p.steps, dilate=p.dilate, preview_every_steps=preview_every,
                           request_id=p.request_id if index == 0 else f"{p.request_id}-{index}")
        if p.seed is not None:
            e.seed = p.seed + index
        if p.guidance_scale is not None:
            e.guidance_scale = p.guidance_scale
        return e

    async def _edit(self, call: HttpCall, p: EditParams, target: Target, index: int) -> pb.EditResult:
        async with aclosing(self.bridge.edit_events(self._request(p, target, index), call, stream=False)) as events:
            async for event in events:
                if event.WhichOneof("event") == "result":
                    return event.result
        raise ApiError(503, "the edit ended without a result", code="no_result")

    async def _image_item(self, request: Request, tenant: str, p: EditParams, image: bytes) -> dict:
        if p.response_format == "b64_json":
            return {"b64_json": base64.b64encode(image).decode()}
        path, expires = await self.bridge.io(self.results.put, tenant, image)
        return {"url": str(request.base_url).rstrip("/") + path, "expires_at": expires}

    @staticmethod
    def _common(target: Target) -> dict:
        return {"background": "opaque", "output_format": "png", "quality": "auto",
                "size": f"{target.record.width}x{target.record.height}"}

    @staticmethod
    def _result(r: pb.EditResult) -> dict:
        return {"request_id": r.request_id, "seed": r.seed, "steps": r.steps, "mask_ratio": round(r.mask_ratio, 6),
                "degraded_reason": r.degraded_reason, "worker": r.worker, "queue_seconds": round(r.queue_seconds, 4),
                "total_seconds": round(r.total_seconds, 4)}

    def _report(self, target: Target, results) -> dict:
        return {"template_id": target.record.template_id, "template_source": target.source,
                "model": target.record.model, "registration_seconds": round(target.registration_seconds, 3),
                "results": [self._result(r) for r in results]}

    # ------------------------------------------------------------------------------------ stream
    async def _sse(self, request: Request, call: HttpCall, tenant, p: EditParams, target: Target):
        """Server-sent events: instgenie.* progress, OpenAI's image_edit.partial_image and .completed."""
        steps = target.record.steps
        every = max(1, steps // (p.partial_images + 1)) if p.partial_images else 0
        common = self._common(target)
        yield _event("instgenie.template", {"template_id": target.record.template_id,
                                            "template_source": target.source,
                                            "registration_seconds": round(target.registration_seconds, 3)})
        partial = 0
        try:
            events = self.bridge.edit_events(self._request(p, target, 0, every), call, stream=True)
            async with aclosing(events):
                async for ev in events:
                    kind = ev.WhichOneof("event")
                    now = int(time.time())
                    if kind == "keepalive":
                        yield b": keepalive\n\n"
                    elif kind == "progress":
                        pr = ev.progress
                        yield _event("instgenie.progress", {"step": pr.step, "total_steps": pr.total_steps,
                                                            "batch_size": pr.batch_size})
                        if pr.preview and partial < max(p.partial_images, 0):
                            yield _event("image_edit.partial_image", {
                                "b64_json": base64.b64encode(pr.preview).decode(), "created_at": now,
                                "partial_image_index": partial, "step": pr.step, **common})
                            partial += 1
                    elif kind == "result":
                        item = await self._image_item(request, tenant.name, p, ev.result.image)
                        yield _event("image_edit.completed", {
                            **item, "created_at": now, **common,
                            "instgenie": self._report(target, [ev.result])})
                    else:
                        body = getattr(ev, kind)
                        fields = {f.name: getattr(body, f.name) for f in body.DESCRIPTOR.fields}
                        yield _event(f"instgenie.{kind}", fields)
        except Exception as exc:  # noqa: BLE001 - the status line is sent: errors travel as an event
            yield _event("error", {"error": api_error(exc).body()["error"]})


def _event(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


def resize_region(region, size: tuple[int, int]):
    """A bool region at another (width, height), nearest neighbour (a mask stays binary)."""
    import numpy as np
    from PIL import Image

    small = Image.fromarray(region.astype(np.uint8) * 255, "L").resize(size, Image.Resampling.NEAREST)
    return np.asarray(small) > 127
