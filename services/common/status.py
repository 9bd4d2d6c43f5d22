"""Service-side errors: raise `ServiceError` (or let an engine/object-store error through) and the handler
decorators answer with the precise gRPC status, a message a user can act on and google.rpc details.

Mapping, in one place:
  * engine errors (instgenie.engine.errors) carry `grpc_code`, a stable `code` (the ErrorInfo reason) and,
    for bad input, the `field` at fault (a BadRequest field violation);
  * object-store errors carry `grpc_code` (UNAVAILABLE when the store is down);
  * a failed downstream call (worker -> scheduler -> gateway) is passed on as it came, details included;
  * anything else is a bug: logged with its traceback, answered INTERNAL with the request id to quote.
"""
from __future__ import annotations

import functools
import inspect
import logging

import grpc

from instgenie.status import FieldViolation, StatusInfo, parse_rpc_error

from .logs import request_id_var
from .objectstore import StoreUnavailable

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An answer other than OK, decided on purpose."""

    def __init__(self, code: grpc.StatusCode, message: str, *, reason: str = "", field: str | None = None,
                 retry_after: float | None = None, metadata: dict[str, str] | None = None):
        super().__init__(message)
        violations = [FieldViolation(field, message)] if field else []
        self.info = StatusInfo(code, message, reason or code.name, violations, retry_after, metadata or {})

    @classmethod
    def of(cls, info: StatusInfo) -> "ServiceError":
        err = cls(info.code, info.message)
        err.info = info
        return err


def invalid(field: str, message: str, reason: str = "INVALID_ARGUMENT") -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message, reason=reason, field=field)


def status_of(exc: BaseException) -> StatusInfo | None:
    """The status an exception stands for, or None if it is a bug (answered INTERNAL)."""
    if isinstance(exc, ServiceError):
        return exc.info
    if isinstance(exc, grpc.aio.AioRpcError) or isinstance(exc, grpc.RpcError):
        return parse_rpc_error(exc)
    if isinstance(exc, StoreUnavailable):
        # Its message names internal endpoints; the client needs to know it is transient, the log the rest.
        log.warning("object store unavailable: %s", exc)
        return StatusInfo(grpc.StatusCode.UNAVAILABLE, "the object store holding templates is unreachable right "
                          "now; retry shortly", "STORE_UNAVAILABLE", retry_after=2.0)
    code_name = getattr(exc, "grpc_code", None)
    if code_name and code_name != "INTERNAL":
        code = grpc.StatusCode[code_name]
        reason = getattr(exc, "code", "") or type(exc).__name__
        field = getattr(exc, "field", None)
        message = str(exc) or type(exc).__name__
        return StatusInfo(code, message, reason, [FieldViolation(field, message)] if field else [])
    return None


def internal(exc: BaseException) -> StatusInfo:
    rid = request_id_var.get()
    log.error("unexpected %s: %s", type(exc).__name__, exc, exc_info=exc)
    return StatusInfo(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); quote request id {rid} "
                      "when reporting it", "INTERNAL")


async def abort(context: grpc.aio.ServicerContext, info: StatusInfo):
    await context.abort(info.code, info.message, trailing_metadata=info.trailing_metadata())


def _answer(exc: BaseException) -> StatusInfo:
    info = status_of(exc)
    return info if info is not None else internal(exc)


def rpc(handler):
    """Decorate a grpc.aio handler (unary coroutine or streaming async generator) to answer errors precisely."""
    if inspect.isasyncgenfunction(handler):
        @functools.wraps(handler)
        async def stream(self, request, context):
            inner = handler(self, request, context)
            try:
                async for item in inner:
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status
                await abort(context, _answer(exc))
            finally:
                # Close the handler now (its `finally` cancels work when the client left), not at GC time.
                await inner.aclose()
        return stream

    @functools.wraps(handler)
    async def unary(self, request, context):
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            await abort(context, _answer(exc))
    return unary


def is_transport_failure(info: StatusInfo) -> bool:
    """A downstream call that failed without an answer from our code (peer died, connection reset).

    Our services put an ErrorInfo (a reason) on every error they send; gRPC's own transport errors have none.
    """
    return info.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                         grpc.StatusCode.CANCELLED) and not info.reason
