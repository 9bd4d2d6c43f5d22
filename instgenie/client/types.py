"""The SDK's value types (templates, operations, models, edit results and stream events) and their proto converters."""
from __future__ import annotations

import enum
import io
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Union

from google.longrunning import operations_pb2
from google.protobuf import timestamp_pb2
from PIL import Image

from instgenie import status as rich_status
from instgenie.gateway.v1 import edit_service_pb2 as pb

from .errors import InstGenIEError, error_from_status


class TemplateState(enum.StrEnum):
    UNSPECIFIED = "unspecified"
    CREATING = "creating"
    READY = "ready"
    FAILED = "failed"


class CacheMode(enum.StrEnum):
    UNSPECIFIED = "unspecified"
    KV = "kv"
    Y = "y"
    O = "o"  # noqa: E741 - the paper's name for UNet output caching


class CancelOutcome(enum.StrEnum):
    UNSPECIFIED = "unspecified"
    CANCELLED = "cancelled"
    ALREADY_FINISHED = "already_finished"


def enum_from_proto(kind: type[enum.StrEnum], proto_enum, prefix: str, value: int):
    # A value newer than this SDK reads as UNSPECIFIED rather than failing the whole call.
    try:
        return kind(proto_enum.Name(value).removeprefix(prefix).lower())
    except ValueError:
        return kind.UNSPECIFIED


def cache_mode_to_proto(mode: str | CacheMode | None) -> int:
    """None or "" asks for the model's default mode (kv for Flux, o for a UNet)."""
    if mode is None or mode == "":
        return pb.CACHE_MODE_UNSPECIFIED
    try:
        mode = CacheMode(str(mode).lower())
    except ValueError:
        raise ValueError(f"cache_mode must be 'kv', 'y' or 'o' (or None: the model's default), not {mode!r}") from None
    return pb.CacheMode.Value(f"CACHE_MODE_{mode.name}")


def _time(ts: timestamp_pb2.Timestamp) -> datetime | None:
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return ts.ToDatetime(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Template:
    template_id: str
    name: str
    state: TemplateState
    model: str
    width: int
    height: int
    steps: int
    prompt: str
    cache_mode: CacheMode
    create_time: datetime | None
    update_time: datetime | None
    cache_bytes: int
    error_message: str
    operation: str

    @classmethod
    def from_proto(cls, msg: pb.Template) -> Template:
        return cls(
            template_id=msg.template_id, name=msg.name,
            state=enum_from_proto(TemplateState, pb.TemplateState, "TEMPLATE_STATE_", msg.state),
            model=msg.model, width=msg.width, height=msg.height, steps=msg.steps, prompt=msg.prompt,
            cache_mode=enum_from_proto(CacheMode, pb.CacheMode, "CACHE_MODE_", msg.cache_mode),
            create_time=_time(msg.create_time), update_time=_time(msg.update_time),
            cache_bytes=msg.cache_bytes, error_message=msg.error_message, operation=msg.operation)


@dataclass(frozen=True)
class TemplatePage:
    """One page of ListTemplates; iterate it for its templates, pass `next_page_token` on for the next."""

    templates: list[Template]
    next_page_token: str

    def __iter__(self) -> Iterator[Template]:
        return iter(self.templates)

    def __len__(self) -> int:
        return len(self.templates)


@dataclass(frozen=True)
class Operation:
    """A template-creation operation: progress while running; `template` or `error` once done."""

    name: str
    done: bool
    template_id: str
    state: TemplateState
    steps_done: int
    total_steps: int
    error: InstGenIEError | None = None
    template: Template | None = None
    create_time: datetime | None = None
    update_time: datetime | None = None

    @classmethod
    def from_proto(cls, msg: operations_pb2.Operation) -> Operation:
        meta = pb.CreateTemplateMetadata()
        if msg.HasField("metadata") and msg.metadata.Is(pb.CreateTemplateMetadata.DESCRIPTOR):
            msg.metadata.Unpack(meta)
        error = template = None
        outcome = msg.WhichOneof("result")
        if outcome == "error":
            error = error_from_status(rich_status.from_proto(msg.error))
        elif outcome == "response" and msg.response.Is(pb.Template.DESCRIPTOR):
            unpacked = pb.Template()
            msg.response.Unpack(unpacked)
            template = Template.from_proto(unpacked)
        state = enum_from_proto(TemplateState, pb.TemplateState, "TEMPLATE_STATE_", meta.state)
        if state is TemplateState.UNSPECIFIED and template is not None:
            state = template.state
        template_id = meta.template_id or (template.template_id if template else "") or \
            msg.name.removeprefix("operations/")
        return cls(name=msg.name, done=msg.done, template_id=template_id, state=state,
                   steps_done=meta.steps_done, total_steps=meta.total_steps, error=error, template=template,
                   create_time=_time(meta.create_time), update_time=_time(meta.update_time))


def operation_name(name_or_template_id: str) -> str:
    """Operation names are "operations/<template_id>"; a bare template id is accepted for convenience."""
    return name_or_template_id if "/" in name_or_template_id else f"operations/{name_or_template_id}"


@dataclass(frozen=True)
class Model:
    name: str
    width: int
    height: int
    default_steps: int
    max_steps: int
    guidance: str  # "none", "distilled" or "cfg"
    default_guidance_scale: float
    workers: int

    @classmethod
    def from_proto(cls, msg: pb.Model) -> Model:
        return cls(name=msg.name, width=msg.width, height=msg.height, default_steps=msg.default_steps,
                   max_steps=msg.max_steps, guidance=msg.guidance,
                   default_guidance_scale=msg.default_guidance_scale, workers=msg.workers)


_SUFFIXES = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}


@dataclass(frozen=True)
class EditResult:
    """The edited image (encoded, usually PNG) and how it was made."""

    request_id: str
    template_id: str
    image: bytes = field(repr=False)
    mime_type: str
    seed: int
    steps: int
    mask_ratio: float  # share of image tokens computed; the rest came from the template's cache
    degraded_reason: str  # non-empty when the cache could not be used and the edit ran in full
    queue_seconds: float
    total_seconds: float
    worker: str

    @classmethod
    def from_proto(cls, msg: pb.EditResult) -> EditResult:
        return cls(request_id=msg.request_id, template_id=msg.template_id, image=msg.image,
                   mime_type=msg.mime_type or "image/png", seed=msg.seed, steps=msg.steps,
                   mask_ratio=msg.mask_ratio, degraded_reason=msg.degraded_reason,
                   queue_seconds=msg.queue_seconds, total_seconds=msg.total_seconds, worker=msg.worker)

    def pil(self) -> Image.Image:
        image = Image.open(io.BytesIO(self.image))
        image.load()
        return image

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Writes the image; the bytes as they came when the suffix fits the format, else re-encoded by suffix."""
        path = Path(path)
        native = _SUFFIXES.get(self.mime_type, "")
        if path.suffix.lower() in ("", native) or (native == ".jpg" and path.suffix.lower() == ".jpeg"):
            path.write_bytes(self.image)
        else:
            image = self.pil()
            if path.suffix.lower() in (".jpg", ".jpeg") and image.mode not in ("L", "RGB"):
                image = image.convert("RGB")  # JPEG has no alpha
            image.save(path)
        return path


# StreamEdit events, in the order a stream usually carries them; every one names its request.
@dataclass(frozen=True)
class Accepted:
    request_id: str
    predicted_seconds: float


@dataclass(frozen=True)
class Queued:
    request_id: str
    position: int  # 1 = next to join the running batch


@dataclass(frozen=True)
class Started:
    request_id: str
    worker: str
    batch_size: int
    cache_tier: str  # "host" or "store"


@dataclass(frozen=True)
class Progress:
    request_id: str
    step: int
    total_steps: int
    batch_size: int


@dataclass(frozen=True)
class Keepalive:
    request_id: str


@dataclass(frozen=True)
class Result:
    request_id: str
    result: EditResult


EditEvent = Union[Accepted, Queued, Started, Progress, Keepalive, Result]


def event_from_proto(msg: pb.StreamEditResponse) -> EditEvent | None:
    """The typed event, or None for an event kind newer than this SDK (skipped, like a keepalive)."""
    kind = msg.WhichOneof("event")
    rid = msg.request_id
    if kind == "accepted":
        return Accepted(rid, msg.accepted.predicted_seconds)
    if kind == "queued":
        return Queued(rid, msg.queued.position)
    if kind == "started":
        return Started(rid, msg.started.worker, msg.started.batch_size, msg.started.cache_tier)
    if kind == "progress":
        return Progress(rid, msg.progress.step, msg.progress.total_steps, msg.progress.batch_size)
    if kind == "keepalive":
        return Keepalive(rid)
    if kind == "result":
        return Result(rid or msg.result.request_id, EditResult.from_proto(msg.result))
    return None
