"""What the sync and asyncio clients share: connection settings, request builders, and which calls are idempotent."""
from __future__ import annotations

import uuid
from dataclasses import dataclass

import grpc
from google.protobuf import duration_pb2

from instgenie import __version__
from instgenie.gateway.v1 import edit_service_pb2 as pb

from .inputs import ImageInput, image_bytes, mask_bytes
from .types import cache_mode_to_proto, operation_name

DEFAULT_ADDRESS = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # images and results are megabytes; gRPC's 4 MiB default is too small

CHANNEL_OPTIONS: tuple[tuple[str, object], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.primary_user_agent", f"instgenie-python/{__version__}"),
)


@dataclass(frozen=True)
class Timeouts:
    """Default deadlines in seconds; every call sets one, a per-call `timeout=` overrides it."""

    default: float = 30.0
    edit: float = 300.0
    create_wait: float = 1800.0  # create_template(wait=True) and waiting on an operation


def channel_options(extra=()) -> list[tuple[str, object]]:
    options = dict(CHANNEL_OPTIONS)
    options.update(dict(extra))
    return list(options.items())


def channel_credentials(root_certificates: bytes | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def new_request_id() -> str:
    """A fresh id for an idempotent edit: fits the server's [A-Za-z0-9][A-Za-z0-9._-]{0,127}."""
    return f"sdk-{uuid.uuid4().hex}"


def create_template_request(image: ImageInput, prompt: str, *, name: str, steps: int, seed: int,
                            guidance_scale: float | None, cache_mode: str | None, model: str,
                            request_id: str | None) -> pb.CreateTemplateRequest:
    request = pb.CreateTemplateRequest(image=image_bytes(image), name=name, prompt=prompt, steps=steps, seed=seed,
                                       cache_mode=cache_mode_to_proto(cache_mode), model=model,
                                       request_id=request_id or "")
    if guidance_scale is not None:
        request.guidance_scale = guidance_scale
    return request


def edit_request(template_id: str, mask: ImageInput, prompt: str, *, seed: int | None, steps: int,
                 guidance_scale: float | None, dilate: int, request_id: str | None) -> pb.EditRequest:
    request = pb.EditRequest(template_id=template_id, mask=mask_bytes(mask), prompt=prompt, steps=steps,
                             dilate=dilate, request_id=request_id or new_request_id())
    if seed is not None:
        request.seed = seed
    if guidance_scale is not None:
        request.guidance_scale = guidance_scale
    return request


def wait_operation_request(name: str, server_wait: float) -> pb.WaitOperationRequest:
    wait = duration_pb2.Duration()
    wait.FromNanoseconds(int(max(0.0, server_wait) * 1e9))
    return pb.WaitOperationRequest(name=operation_name(name), timeout=wait)


def wait_grace(seconds: float) -> float:
    """Extra deadline beyond a WaitOperation's own timeout, so the server answers with the state, not a timeout."""
    return min(5.0, 0.1 * seconds + 0.5)
