"""Rich gRPC errors: canonical status codes with google.rpc details, built by the services and read by the SDK.

Every error InstGenIE answers with carries an `ErrorInfo` (a stable `reason` in the "instgenie.dev" domain);
bad input adds a `BadRequest` naming the field, capacity limits a `RetryInfo` saying when to come back. The
details travel in the `grpc-status-details-bin` trailer, which survives every hop unchanged, so an error a
worker raised reaches the client with its code, message and details as the worker wrote them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "instgenie.dev"
DETAILS_KEY = "grpc-status-details-bin"


@dataclass
class FieldViolation:
    field: str
    description: str


@dataclass
class StatusInfo:
    """A gRPC error as the services build it and the SDK reads it."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    violations: list[FieldViolation] = field(default_factory=list)
    retry_after: float | None = None  # seconds, from RetryInfo
    metadata: dict[str, str] = field(default_factory=dict)  # ErrorInfo metadata

    def to_proto(self) -> status_pb2.Status:
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        info = error_details_pb2.ErrorInfo(reason=self.reason or self.code.name, domain=DOMAIN,
                                           metadata=self.metadata)
        status.details.add().Pack(info)
        if self.violations:
            bad = error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in self.violations])
            status.details.add().Pack(bad)
        if self.retry_after is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(max(0.0, self.retry_after) * 1e9))
            status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        return status

    def to_grpc_status(self) -> grpc.Status:
        return rpc_status.to_status(self.to_proto())

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return ((DETAILS_KEY, self.to_proto().SerializeToString()),)


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def from_proto(status: status_pb2.Status) -> StatusInfo:
    info = StatusInfo(code=_CODES.get(status.code, grpc.StatusCode.UNKNOWN), message=status.message)
    for any_ in status.details:
        if any_.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail = error_details_pb2.ErrorInfo()
            any_.Unpack(detail)
            info.reason, info.metadata = detail.reason, dict(detail.metadata)
        elif any_.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            detail = error_details_pb2.BadRequest()
            any_.Unpack(detail)
            info.violations += [FieldViolation(v.field, v.description) for v in detail.field_violations]
        elif any_.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            detail = error_details_pb2.RetryInfo()
            any_.Unpack(detail)
            info.retry_after = detail.retry_delay.ToNanoseconds() / 1e9
    return info


def parse_rpc_error(error: grpc.RpcError) -> StatusInfo:
    """Code, message and details of a failed call (sync or asyncio); plain errors get their code and text only."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    message = error.details() if callable(getattr(error, "details", None)) else str(error)
    trailers = error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else None
    for key, value in trailers or ():
        if key == DETAILS_KEY:
            try:
                parsed = from_proto(status_pb2.Status.FromString(value))
            except Exception:  # noqa: BLE001 - a mangled trailer must not hide the error itself
                break
            if parsed.code == code:
                parsed.message = message or parsed.message
                return parsed
    return StatusInfo(code=code or grpc.StatusCode.UNKNOWN, message=message or "")


assert code_pb2.INVALID_ARGUMENT == grpc.StatusCode.INVALID_ARGUMENT.value[0]  # the two numberings agree
