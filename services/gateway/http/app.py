"""The HTTP application: routes, OpenAI-shaped errors for everything (unknown URLs included), the web page."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..service import GatewayService
from .bridge import Bridge, HttpCall, answering
from .edits import ImageEdits
from .errors import ApiError
from .results import ResultLinks
from .templates_api import TemplatesApi

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
#: the page loads only its own files and talks only to this origin
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'self'; img-src 'self' blob: data:; script-src 'self'; "
                                 b"style-src 'self'; connect-src 'self'; frame-ancestors 'none'"),
]


class _SecurityHeaders:
    """Pure ASGI middleware (it does not buffer streamed responses) adding SECURITY_HEADERS."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


def route_span_details(app: Starlette):
    """Span names for the tracing middleware: "METHOD /route/{template}", one per route whatever its ids, and
    "METHOD unmatched" for unknown URLs; a method outside HTTP's own is "HTTP" (a name per raw path or method
    would grow without bound)."""
    from opentelemetry.util.http import sanitize_method
    from starlette.routing import Match

    def details(scope) -> tuple[str, dict]:
        method = sanitize_method(scope.get("method", "").strip())  # a client's own method name: "_OTHER"
        method = "HTTP" if method in ("_OTHER", "") else method
        partial = None  # as Starlette's router: a path whose route takes other methods answers 405 from it
        for route in app.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return f"{method} {route.path}", {"http.route": route.path}
            if match == Match.PARTIAL and partial is None:
                partial = route
        if partial is not None:
            return f"{method} {partial.path}", {"http.route": partial.path}
        return f"{method} unmatched", {}

    return details


def build_app(service: GatewayService, *, ready: Callable[[], bool], result_ttl: float = 3600.0) -> Starlette:
    bridge = Bridge(service)
    results = ResultLinks(service.records.store, ttl_seconds=result_ttl)
    edits = ImageEdits(bridge, results)
    templates = TemplatesApi(bridge)

    async def models(request: Request):
        call = HttpCall(request.headers.get("authorization", ""), 10.0)
        async with answering():
            bridge.tenant(call)
        served = await bridge.models()
        workers = service._model_workers
        return JSONResponse({"object": "list", "data": [
            {"id": m.model_id, "object": "model", "created": 0, "owned_by": "instgenie", "width": m.width,
             "height": m.height, "size": f"{m.width}x{m.height}", "default_steps": m.default_steps,
             "max_steps": m.max_steps, "guidance": m.guidance, "workers": workers.get(m.model_id, 0)}
            for m in sorted(served.values(), key=lambda m: m.model_id)]})

    async def result(request: Request):
        data = await bridge.io(results.get, request.path_params["tenant"], request.path_params["name"])
        if data is None:
            raise ApiError(404, "no such result, or its link has expired; edit again", code="result_not_found")
        return Response(data, media_type="image/png", headers={"cache-control": "private, max-age=300"})

    async def healthz(request: Request):
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request):
        ok = ready()
        return JSONResponse({"status": "ready" if ok else "not ready",
                             "scheduler": "reachable" if ok else "unreachable"}, status_code=200 if ok else 503)

    async def api_error(request: Request, exc: ApiError):
        if exc.status >= 500:
            log.warning("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.message)
        return exc.response()

    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            message, code = f"unknown request URL: {request.method} {request.url.path}", "unknown_url"
        elif exc.status_code == 405:
            message, code = f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            message, code = str(exc.detail), "http_error"
        return ApiError(exc.status_code, message, code=code).response()

    async def server_error(request: Request, exc: Exception):
        log.error("unexpected %s on %s %s", type(exc).__name__, request.method, request.url.path, exc_info=exc)
        return ApiError(500, f"internal error ({type(exc).__name__})", code="internal").response()

    routes = [
        Route("/v1/images/edits", edits.handle, methods=["POST"]),
        Route("/v1/images/results/{tenant}/{name}", result, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/templates", templates.list, methods=["GET"]),
        Route("/v1/templates", templates.create, methods=["POST"]),
        Route("/v1/templates/{template_id}", templates.get, methods=["GET"]),
        Route("/v1/templates/{template_id}", templates.delete, methods=["DELETE"]),
        Route("/v1/templates/{template_id}/image", templates.image, methods=["GET"]),
        Route("/v1/templates/{template_id}/events", templates.events, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/", lambda request: RedirectResponse("/web/"), methods=["GET"]),
        Mount("/web", StaticFiles(directory=WEB_DIR, html=True), name="web"),
    ]
    app = Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error,
                                                       Exception: server_error})
    app.add_middleware(_SecurityHeaders)
    return app
