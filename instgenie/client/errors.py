"""Typed SDK errors: one exception class per canonical gRPC code, built from the service's rich status."""
from __future__ import annotations

import grpc

from instgenie.status import FieldViolation, StatusInfo, parse_rpc_error

__all__ = [
    "InstGenIEError", "InvalidArgument", "NotFound", "AlreadyExists", "PermissionDenied", "Unauthenticated",
    "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange", "Unavailable", "DeadlineExceeded",
    "Cancelled", "DataLoss", "Internal", "Unknown", "Unimplemented", "FieldViolation", "error_from_rpc",
    "error_from_status",
]


class InstGenIEError(Exception):
    """A call that did not succeed: its gRPC code, the server's message and the google.rpc details.

    `reason` is the stable ErrorInfo reason (branch on it, not on the message), `violations` the fields a bad
    request got wrong, `retry_after` the server's hint in seconds (RetryInfo) or None. `earlier` holds the
    errors of earlier attempts of the same call that the SDK retried; `attempts` counts them all.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, reason: str = "",
                 violations: list[FieldViolation] | None = None, retry_after: float | None = None,
                 metadata: dict[str, str] | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.reason = reason
        self.violations = list(violations or [])
        self.retry_after = retry_after
        self.metadata = dict(metadata or {})
        self.earlier: tuple[InstGenIEError, ...] = ()

    @property
    def attempts(self) -> int:
        return len(self.earlier) + 1

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message or self.code.name.lower().replace('_', ' ')}"
        if self.violations:
            # A violation that only repeats the message adds just its field name.
            text += " [" + "; ".join(v.field if v.description in ("", self.message) else f"{v.field}: {v.description}"
                                     for v in self.violations) + "]"
        if self.retry_after is not None:
            text += f" (retry after {self.retry_after:g} s)"
        if self.earlier:
            text += f" (after {self.attempts} attempts)"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r})"


def _subclass(name: str, code: grpc.StatusCode, doc: str) -> type[InstGenIEError]:
    return type(name, (InstGenIEError,), {"code": code, "__doc__": doc, "__module__": __name__})


InvalidArgument = _subclass("InvalidArgument", grpc.StatusCode.INVALID_ARGUMENT,
                            "The request is wrong; `violations` names the fields.")
NotFound = _subclass("NotFound", grpc.StatusCode.NOT_FOUND,
                     "No such template or operation for this tenant.")
AlreadyExists = _subclass("AlreadyExists", grpc.StatusCode.ALREADY_EXISTS,
                          "The request id was already used with other inputs.")
PermissionDenied = _subclass("PermissionDenied", grpc.StatusCode.PERMISSION_DENIED,
                             "The API key may not do this.")
Unauthenticated = _subclass("Unauthenticated", grpc.StatusCode.UNAUTHENTICATED,
                            "No API key, or one the gateway does not know.")
ResourceExhausted = _subclass("ResourceExhausted", grpc.StatusCode.RESOURCE_EXHAUSTED,
                              "Over capacity or quota; `retry_after` says when to come back.")
FailedPrecondition = _subclass("FailedPrecondition", grpc.StatusCode.FAILED_PRECONDITION,
                               "The target is not in a state that allows this (e.g. a template still creating).")
Aborted = _subclass("Aborted", grpc.StatusCode.ABORTED, "A conflict with a concurrent change; retry the whole step.")
OutOfRange = _subclass("OutOfRange", grpc.StatusCode.OUT_OF_RANGE, "A value past the valid range (e.g. a page).")
Unavailable = _subclass("Unavailable", grpc.StatusCode.UNAVAILABLE,
                        "The service could not be reached or is overloaded for a moment.")
DeadlineExceeded = _subclass("DeadlineExceeded", grpc.StatusCode.DEADLINE_EXCEEDED,
                             "The call's deadline passed before it finished.")
Cancelled = _subclass("Cancelled", grpc.StatusCode.CANCELLED, "The call or the edit was cancelled.")
DataLoss = _subclass("DataLoss", grpc.StatusCode.DATA_LOSS, "Stored data is lost or corrupt.")
Internal = _subclass("Internal", grpc.StatusCode.INTERNAL, "A bug on the server side; quote the message.")
Unknown = _subclass("Unknown", grpc.StatusCode.UNKNOWN, "An error the server did not classify.")
Unimplemented = _subclass("Unimplemented", grpc.StatusCode.UNIMPLEMENTED,
                          "The server does not offer this call (an older or different deployment).")

_BY_CODE: dict[grpc.StatusCode, type[InstGenIEError]] = {
    cls.code: cls for cls in (InvalidArgument, NotFound, AlreadyExists, PermissionDenied, Unauthenticated,
                              ResourceExhausted, FailedPrecondition, Aborted, OutOfRange, Unavailable,
                              DeadlineExceeded, Cancelled, DataLoss, Internal, Unknown, Unimplemented)}


def error_from_status(info: StatusInfo) -> InstGenIEError:
    """The typed error for a decoded status (a failed call, or a failed long-running operation)."""
    cls = _BY_CODE.get(info.code, InstGenIEError)
    return cls(info.message, code=info.code, reason=info.reason, violations=info.violations,
               retry_after=info.retry_after, metadata=info.metadata)


def error_from_rpc(err: grpc.RpcError) -> InstGenIEError:
    """The typed error for a failed sync or asyncio call, with its google.rpc details decoded."""
    return error_from_status(parse_rpc_error(err))
