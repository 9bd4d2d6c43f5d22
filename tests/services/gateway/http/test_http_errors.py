"""gRPC statuses as OpenAI-shaped HTTP errors: status, type, param and code."""
from __future__ import annotations

import grpc
import pytest

from instgenie.services.gateway.http.errors import ApiError
from instgenie.status import FieldViolation, StatusInfo

C = grpc.StatusCode


@pytest.mark.parametrize("code,reason,status,kind", [
    (C.INVALID_ARGUMENT, "EMPTY_MASK", 400, "invalid_request_error"),
    (C.INVALID_ARGUMENT, "IMAGE_TOO_LARGE", 413, "invalid_request_error"),
    (C.UNAUTHENTICATED, "INVALID_API_KEY", 401, "authentication_error"),
    (C.PERMISSION_DENIED, "MODEL_NOT_ALLOWED", 403, "permission_error"),
    (C.NOT_FOUND, "TEMPLATE_NOT_FOUND", 404, "invalid_request_error"),
    (C.ALREADY_EXISTS, "REQUEST_ID_REUSED", 409, "invalid_request_error"),
    (C.FAILED_PRECONDITION, "TEMPLATE_CREATING", 409, "invalid_request_error"),
    (C.RESOURCE_EXHAUSTED, "TENANT_LIMIT", 429, "rate_limit_error"),
    (C.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", 504, "server_error"),
    (C.UNAVAILABLE, "NO_WORKER", 503, "server_error"),
    (C.INTERNAL, "INTERNAL", 500, "server_error"),
])
def test_status_mapping(code, reason, status, kind):
    info = StatusInfo(code, "what went wrong", reason, [FieldViolation("mask", "what went wrong")], retry_after=2.4)
    err = ApiError.of(info)
    assert err.status == status
    assert err.body() == {"error": {"message": "what went wrong", "type": kind, "param": "mask",
                                    "code": reason.lower()}}
    response = err.response()
    assert response.status_code == status and response.headers["retry-after"] == "2"
