"""The InstGenIE Python SDK: `Client` (sync) and `AsyncClient` (asyncio) for the gateway's EditService.

    from instgenie.client import Client
    with Client("127.0.0.1:50051", api_key="...") as client:
        template = client.create_template("photo.png", prompt="a red car")
        client.edit(template.template_id, "mask.png", prompt="a blue car").save("edited.png")
"""
from . import errors
from .aio import AsyncClient
from .errors import (Aborted, AlreadyExists, Cancelled, DataLoss, DeadlineExceeded, FailedPrecondition,
                     FieldViolation, InstGenIEError, Internal, InvalidArgument, NotFound, OutOfRange,
                     PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable, Unimplemented, Unknown,
                     error_from_rpc)
from .inputs import image_bytes, mask_bytes
from .retry import RetryPolicy
from .sync import Client
from .types import (Accepted, CacheMode, CancelOutcome, EditEvent, EditResult, Keepalive, Model, Operation,
                    Progress, Queued, Result, Started, Template, TemplatePage, TemplateState)

__all__ = [
    "Client", "AsyncClient", "errors", "RetryPolicy", "image_bytes", "mask_bytes",
    "Template", "TemplatePage", "TemplateState", "CacheMode", "Operation", "Model", "EditResult", "CancelOutcome",
    "EditEvent", "Accepted", "Queued", "Started", "Progress", "Keepalive", "Result",
    "InstGenIEError", "InvalidArgument", "NotFound", "AlreadyExists", "PermissionDenied", "Unauthenticated",
    "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange", "Unavailable", "DeadlineExceeded",
    "Cancelled", "DataLoss", "Internal", "Unknown", "Unimplemented", "FieldViolation", "error_from_rpc",
]
