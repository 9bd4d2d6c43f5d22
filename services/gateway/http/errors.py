"""OpenAI-shaped HTTP errors: one exception type, the status mapping from gRPC codes, the error body."""
from __future__ import annotations

import grpc
from starlette.responses import JSONResponse

from instgenie.status import StatusInfo

C = grpc.StatusCode
#: gRPC code -> HTTP status. 499 is the de-facto "client closed request" status.
HTTP_STATUS = {
    C.INVALID_ARGUMENT: 400, C.OUT_OF_RANGE: 400, C.UNAUTHENTICATED: 401, C.PERMISSION_DENIED: 403,
    C.NOT_FOUND: 404, C.ALREADY_EXISTS: 409, C.ABORTED: 409, C.FAILED_PRECONDITION: 409,
    C.RESOURCE_EXHAUSTED: 429, C.CANCELLED: 499, C.UNIMPLEMENTED: 501, C.UNAVAILABLE: 503,
    C.DEADLINE_EXCEEDED: 504, C.DATA_LOSS: 500, C.INTERNAL: 500, C.UNKNOWN: 500,
}
#: reasons whose HTTP status is more precise than their gRPC code's
REASON_STATUS = {"IMAGE_TOO_LARGE": 413, "BODY_TOO_LARGE": 413}


def error_type(status: int) -> str:
    """OpenAI's `type` for a status: clients branch on the status, people read the type."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


class ApiError(Exception):
    """An HTTP answer other than 2xx, with OpenAI's error body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after

    @classmethod
    def of(cls, info: StatusInfo) -> "ApiError":
        """The HTTP face of a gateway status: same message, the field as `param`, the reason as `code`."""
        status = REASON_STATUS.get(info.reason, HTTP_STATUS.get(info.code, 500))
        param = info.violations[0].field if info.violations else None
        return cls(status, info.message, param=param, code=(info.reason or info.code.name).lower(),
                   retry_after=info.retry_after)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": error_type(self.status), "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after is not None:
            headers["retry-after"] = str(max(1, round(self.retry_after)))
        if self.status == 401:
            headers["www-authenticate"] = 'Bearer realm="instgenie"'
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad(param: str | None, message: str, code: str = "invalid_value", status: int = 400) -> ApiError:
    return ApiError(status, message, param=param, code=code)
