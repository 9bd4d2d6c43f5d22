"""HTTP calls into GatewayService's own handlers: the same auth, validation, records and scheduler client.

The HTTP front keeps no second implementation of any of them. A handler reads two things from its gRPC
context, the call's metadata (the bearer key) and the time left, so `HttpCall` offers exactly those, and the
handlers run undecorated (`__wrapped__`): their errors reach the HTTP layer as exceptions and are answered
with the status the `@rpc` decorator would have chosen (`status_of`), in OpenAI's error shape.
"""
from __future__ import annotations

import time
from contextlib import asynccontextmanager

from instgenie.gateway.v1 import edit_service_pb2 as pb

from ...common.status import internal, status_of
from ..auth import Tenant
from ..service import GatewayService
from ..templates import TemplateRecord
from .errors import ApiError


class HttpCall:
    """The slice of a grpc.aio ServicerContext that GatewayService reads, for a request that came over HTTP."""

    def __init__(self, authorization: str, timeout: float | None = None):
        self._metadata = (("authorization", authorization),) if authorization else ()
        self._deadline = None if timeout is None else time.monotonic() + timeout

    def invocation_metadata(self):
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def with_timeout(self, timeout: float) -> "HttpCall":
        """The same caller with another deadline (a registration the edit waits for has its own)."""
        other = HttpCall("", timeout)
        other._metadata = self._metadata
        return other


def api_error(exc: BaseException) -> ApiError:
    """The OpenAI-shaped answer to whatever a handler raised (a bug becomes a 500 quoting the request id)."""
    if isinstance(exc, ApiError):
        return exc
    info = status_of(exc)
    return ApiError.of(info if info is not None else internal(exc))


@asynccontextmanager
async def answering():
    """Turn any failure inside the block into an ApiError."""
    try:
        yield
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes an HTTP answer
        raise api_error(exc) from None


class Bridge:
    """GatewayService's public handlers as plain coroutines (and async iterators) for HTTP routes."""

    def __init__(self, service: GatewayService):
        self.service = service

    def _handler(self, name: str):
        method = getattr(type(self.service), name)
        return getattr(method, "__wrapped__", method)

    def tenant(self, call: HttpCall) -> Tenant:
        return self.service.keys.authenticate(call.invocation_metadata())

    async def unary(self, name: str, request, call: HttpCall):
        async with answering():
            return await self._handler(name)(self.service, request, call)

    async def stream(self, name: str, request, call: HttpCall):
        """An iterator over a server-streaming handler's messages; failures raise ApiError."""
        async with answering():
            async for msg in self._handler(name)(self.service, request, call):
                yield msg

    async def edit_events(self, edit: pb.EditRequest, call: HttpCall, stream: bool):
        """The events of one edit as StreamEdit would send them (every step and previews when `stream`)."""
        async with answering():
            async for event in self.service._edit_events(edit, call, stream=stream):
                yield event

    async def record(self, tenant: Tenant, template_id: str, *, fresh: bool = False) -> TemplateRecord:
        async with answering():
            return await self.service._record(tenant, template_id, fresh=fresh)

    async def io(self, fn, *args, **kwargs):
        """Blocking store work on the gateway's I/O pool."""
        async with answering():
            return await self.service._io_call(fn, *args, **kwargs)

    async def models(self) -> dict:
        async with answering():
            return await self.service.models(refresh=True)

    async def choose_model(self, requested: str, width: int, height: int):
        """The model that serves an image of this size (or `requested`), by the gateway's own rule."""
        async with answering():
            return await self.service._choose_model(requested, width, height)
