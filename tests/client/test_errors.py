"""Typed errors: every canonical code has its class, and google.rpc details reach the caller parsed."""
from __future__ import annotations

import grpc
import pytest

from instgenie.client import errors
from instgenie.client.errors import (InstGenIEError, InvalidArgument, ResourceExhausted, Unauthenticated,
                                     error_from_status)
from instgenie.status import FieldViolation, StatusInfo
from tests.client.scripted_server import Fail, invalid_argument

USER_CODES = {
    "INVALID_ARGUMENT": "InvalidArgument", "NOT_FOUND": "NotFound", "ALREADY_EXISTS": "AlreadyExists",
    "PERMISSION_DENIED": "PermissionDenied", "UNAUTHENTICATED": "Unauthenticated",
    "RESOURCE_EXHAUSTED": "ResourceExhausted", "FAILED_PRECONDITION": "FailedPrecondition", "ABORTED": "Aborted",
    "OUT_OF_RANGE": "OutOfRange", "UNAVAILABLE": "Unavailable", "DEADLINE_EXCEEDED": "DeadlineExceeded",
    "CANCELLED": "Cancelled", "DATA_LOSS": "DataLoss", "INTERNAL": "Internal", "UNKNOWN": "Unknown",
    "UNIMPLEMENTED": "Unimplemented",
}


@pytest.mark.parametrize("code_name,class_name", sorted(USER_CODES.items()))
def test_each_code_has_its_own_class(code_name, class_name):
    code = grpc.StatusCode[code_name]
    err = error_from_status(StatusInfo(code, "boom", reason="WHY"))
    cls = getattr(errors, class_name)
    assert type(err) is cls and issubclass(cls, InstGenIEError)
    assert err.code == code and cls.code == code
    assert (err.message, err.reason) == ("boom", "WHY")


def test_str_is_one_line_with_violations_and_retry_hint():
    err = error_from_status(StatusInfo(grpc.StatusCode.INVALID_ARGUMENT, "bad request", violations=[
        FieldViolation("mask", "the mask is empty"), FieldViolation("dilate", "must be 0-8")]))
    assert str(err) == "INVALID_ARGUMENT: bad request [mask: the mask is empty; dilate: must be 0-8]"
    busy = error_from_status(StatusInfo(grpc.StatusCode.RESOURCE_EXHAUSTED, "cluster full", retry_after=2.5))
    assert str(busy) == "RESOURCE_EXHAUSTED: cluster full (retry after 2.5 s)"
    assert "\n" not in str(err) + str(busy)
    # The gateway often repeats the message as the field's description: then the field name is enough.
    echo = error_from_status(StatusInfo(grpc.StatusCode.INVALID_ARGUMENT, "steps must be 1-200",
                                        violations=[FieldViolation("steps", "steps must be 1-200")]))
    assert str(echo) == "INVALID_ARGUMENT: steps must be 1-200 [steps]"


def test_str_counts_attempts_when_retried():
    err = error_from_status(StatusInfo(grpc.StatusCode.UNAVAILABLE, "down"))
    err.earlier = (error_from_status(StatusInfo(grpc.StatusCode.UNAVAILABLE, "down")),)
    assert err.attempts == 2
    assert str(err) == "UNAVAILABLE: down (after 2 attempts)"


def test_violations_from_trailing_metadata(service, client):
    service.script("GetTemplate", invalid_argument("template_id", "must not be empty"))
    with pytest.raises(InvalidArgument) as caught:
        client.get_template("")
    err = caught.value
    assert err.message == "bad mask" and err.reason == "MASK_EMPTY"
    assert [(v.field, v.description) for v in err.violations] == [("template_id", "must not be empty")]
    assert isinstance(err.__cause__, grpc.RpcError)  # the raw gRPC error stays reachable


def test_retry_info_from_abort_with_status(service, client):
    info = StatusInfo(grpc.StatusCode.RESOURCE_EXHAUSTED, "tenant over its limit", reason="TENANT_LIMIT",
                      retry_after=1.5, metadata={"limit": "8"})
    service.script("ListModels", Fail(grpc.StatusCode.RESOURCE_EXHAUSTED, "", info, via_status=True))
    with pytest.raises(ResourceExhausted) as caught:
        client.list_models()
    err = caught.value
    assert (err.message, err.reason, err.retry_after, err.metadata) == \
        ("tenant over its limit", "TENANT_LIMIT", 1.5, {"limit": "8"})


def test_plain_error_without_details(service, client):
    service.script("GetTemplate", Fail(grpc.StatusCode.NOT_FOUND, "no template tpl-9"))
    with pytest.raises(errors.NotFound) as caught:
        client.get_template("tpl-9")
    assert (caught.value.message, caught.value.reason, caught.value.violations) == ("no template tpl-9", "", [])


def test_missing_api_key_is_unauthenticated(address, service, sleeps):
    from instgenie.client import Client
    service.script("ListModels", Fail(grpc.StatusCode.INTERNAL, "never reached"))
    with Client(address) as anonymous:
        with pytest.raises(Unauthenticated) as caught:
            anonymous.list_models()
    assert caught.value.reason == "API_KEY_INVALID"
    assert "authorization" not in service.calls("ListModels")[0].metadata
