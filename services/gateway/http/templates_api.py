"""The tenant's templates over HTTP (JSON and server-sent events) for the web page: list, create, watch, image."""
from __future__ import annotations

import json
from contextlib import aclosing

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from instgenie.gateway.v1 import edit_service_pb2 as pb

from .. import validation as v
from .bridge import Bridge, HttpCall, answering
from .errors import ApiError, bad
from .forms import Fields, read_form

_STATES = {pb.TEMPLATE_STATE_CREATING: "creating", pb.TEMPLATE_STATE_READY: "ready",
           pb.TEMPLATE_STATE_FAILED: "failed"}
_MODES = {"": pb.CACHE_MODE_UNSPECIFIED, "kv": pb.CACHE_MODE_KV, "y": pb.CACHE_MODE_Y, "o": pb.CACHE_MODE_O}
_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"RIFF", "image/webp"), (b"GIF8", "image/gif"),
          (b"BM", "image/bmp"))


def template_json(t: pb.Template) -> dict:
    return {"id": t.template_id, "object": "template", "name": t.name, "state": _STATES.get(t.state, "unknown"),
            "model": t.model, "width": t.width, "height": t.height, "steps": t.steps, "prompt": t.prompt,
            "cache_bytes": t.cache_bytes, "error": t.error_message, "operation": t.operation,
            "created_at": t.create_time.seconds, "updated_at": t.update_time.seconds,
            "image_url": f"/v1/templates/{t.template_id}/image"}


def operation_json(op) -> dict:
    meta = pb.CreateTemplateMetadata()
    op.metadata.Unpack(meta)
    out = {"operation": op.name, "template_id": meta.template_id, "state": _STATES.get(meta.state, "unknown"),
           "steps_done": meta.steps_done, "total_steps": meta.total_steps, "done": op.done}
    if op.HasField("error"):
        out["error"] = op.error.message
    return out


def _call(request: Request, timeout: float | None = 30.0) -> HttpCall:
    return HttpCall(request.headers.get("authorization", ""), timeout)


class TemplatesApi:
    def __init__(self, bridge: Bridge):
        self.bridge = bridge

    async def list(self, request: Request):
        size = request.query_params.get("page_size", "0")
        if not size.isdigit():
            raise bad("page_size", f"page_size must be a whole number, got {size[:20]!r}")
        resp = await self.bridge.unary("ListTemplates", pb.ListTemplatesRequest(
            page_size=int(size), page_token=request.query_params.get("page_token", "")), _call(request))
        return JSONResponse({"object": "list", "data": [template_json(t) for t in resp.templates],
                             "next_page_token": resp.next_page_token or None})

    async def create(self, request: Request):
        call = _call(request)
        async with answering():
            self.bridge.tenant(call)
        limits = self.bridge.service.config.limits
        form = await read_form(request, max_body=limits.image.max_bytes + 1024 * 1024)
        try:
            async with answering():
                f = Fields(form, {"image", "name", "prompt", "steps", "seed", "cache_mode", "model", "request_id"})
                image = await f.file("image", max_bytes=limits.image.max_bytes, required=True)
                req = pb.CreateTemplateRequest(
                    image=image.data, name=f.text("name", max_chars=limits.max_name_chars) or "",
                    prompt=f.text("prompt", max_chars=limits.max_prompt_chars) or "",
                    steps=f.integer("steps", 0, 10_000) or 0, seed=f.integer("seed", 0, v.MAX_SEED) or 0,
                    cache_mode=_MODES[f.choice("cache_mode", ("kv", "y", "o"), "")], model=f.text("model") or "",
                    request_id=f.text("request_id", max_chars=128) or "")
        finally:
            await form.close()
        op = (await self.bridge.unary("CreateTemplate", req, call)).operation
        return JSONResponse(operation_json(op), status_code=202)

    async def get(self, request: Request):
        resp = await self.bridge.unary("GetTemplate", pb.GetTemplateRequest(
            template_id=request.path_params["template_id"]), _call(request))
        return JSONResponse(template_json(resp.template))

    async def delete(self, request: Request):
        template_id = request.path_params["template_id"]
        await self.bridge.unary("DeleteTemplate", pb.DeleteTemplateRequest(template_id=template_id), _call(request))
        return JSONResponse({"id": template_id, "object": "template", "deleted": True})

    async def image(self, request: Request):
        call = _call(request)
        template_id = request.path_params["template_id"]
        async with answering():
            tenant = self.bridge.tenant(call)
            v.check_template_id(template_id)
        record = await self.bridge.record(tenant, template_id)  # 404 for another tenant's, as everywhere
        data = await self.bridge.io(self.bridge.service.records.image, tenant.name, template_id)
        if data is None:
            raise ApiError(404, f"template {template_id} has no stored image (created before images were kept)",
                           param="template_id", code="image_not_found")
        mime = next((m for magic, m in _MAGIC if data.startswith(magic)), "application/octet-stream")
        return Response(data, media_type=mime, headers={"cache-control": "private, max-age=3600",
                                                        "x-instgenie-template-state": record.state.lower()})

    async def events(self, request: Request):
        """The creation operation as server-sent events, one per change, ending with the done state."""
        call = _call(request, timeout=self.bridge.service.config.default_create_deadline)
        name = f"operations/{request.path_params['template_id']}"
        stream = self.bridge.stream("WatchOperation", pb.WatchOperationRequest(name=name), call)
        first = await anext(stream)  # errors (auth, unknown template) before the 200, as a JSON error

        async def events():
            async with aclosing(stream):
                yield _event("operation", operation_json(first.operation))
                try:
                    async for msg in stream:
                        yield _event("operation", operation_json(msg.operation))
                except ApiError as err:
                    yield _event("error", err.body())

        return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-store"})


def _event(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()
