"""Multipart uploads with bounded size, and typed form fields that refuse wrong types in OpenAI's error shape."""
from __future__ import annotations

from dataclasses import dataclass

from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from .errors import ApiError, bad

#: text fields (prompt, sizes, numbers) are small; a bigger one is a client bug, not a prompt
MAX_TEXT_FIELD_BYTES = 64 * 1024
#: an oversized body is read and dropped up to this many times its limit, so the client gets the 413 rather
#: than a reset connection; beyond that the connection is closed
DRAIN_FACTOR = 4


class _TooLarge(Exception):
    pass


@dataclass
class Upload:
    """One file part, read in full (its size was bounded while it streamed in)."""

    name: str
    filename: str
    content_type: str
    data: bytes


async def read_form(request: Request, max_body: int, max_files: int = 4, max_fields: int = 40) -> FormData:
    """The request's multipart form; 413 past `max_body` bytes, 400 for anything that is not multipart."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise bad(None, f"send multipart/form-data (got {content_type or 'no content type'!r})",
                  code="invalid_content_type")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body * DRAIN_FACTOR:
        raise _too_large(max_body, int(declared))
    seen, ended = 0, False

    async def limited():
        # ASGI messages read here (not through request.stream()) so that we know whether the body has ended.
        nonlocal seen, ended
        while not ended:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            body = message.get("body", b"")
            ended = not message.get("more_body", False)
            seen += len(body)
            if seen > max_body:
                raise _TooLarge()
            if body:
                yield body

    parser = MultiPartParser(request.headers, limited(), max_files=max_files, max_fields=max_fields,
                             max_part_size=MAX_TEXT_FIELD_BYTES)
    try:
        return await parser.parse()
    except _TooLarge:
        if not ended:
            seen += await _drain(request, max_body * DRAIN_FACTOR - seen)
        raise _too_large(max_body, seen) from None
    except MultiPartException as exc:
        raise bad(None, f"malformed multipart body: {exc.message}", code="invalid_multipart") from None


async def _drain(request: Request, budget: int) -> int:
    """Read and drop the rest of the body, up to `budget` bytes."""
    dropped = 0
    while dropped <= budget:
        message = await request.receive()
        if message["type"] != "http.request":
            break
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return dropped


def _too_large(limit: int, got: int) -> ApiError:
    return ApiError(413, f"request body is at least {got} bytes; at most {limit} are accepted (images and masks "
                    "each have their own limit within it)", code="body_too_large")


class Fields:
    """Typed access to a parsed form; every refusal names the field (`param`)."""

    def __init__(self, form: FormData, known: set[str]):
        self.form = form
        for name in form.keys():
            if name not in known:
                raise bad(name, f"unknown parameter {name!r}; accepted: {', '.join(sorted(known))}",
                          code="unknown_parameter")

    def _one(self, name: str):
        values = self.form.getlist(name)
        if len(values) > 1:
            raise bad(name, f"{name} was sent {len(values)} times; send it once", code="duplicate_parameter")
        return values[0] if values else None

    def text(self, name: str, *, required: bool = False, max_chars: int | None = None) -> str | None:
        value = self._one(name)
        if value is None or value == "":
            if required:
                raise bad(name, f"{name} is required", code="missing_required_parameter")
            return None
        if isinstance(value, UploadFile):
            raise bad(name, f"{name} must be a text field, not a file", code="invalid_type")
        if max_chars is not None and len(value) > max_chars:
            raise bad(name, f"{name} has {len(value)} characters; at most {max_chars} are accepted")
        return value

    def integer(self, name: str, lo: int, hi: int) -> int | None:
        value = self.text(name)
        if value is None:
            return None
        try:
            number = int(value.strip())
        except ValueError:
            raise bad(name, f"{name} must be an integer, got {value[:40]!r}", code="invalid_type") from None
        if not lo <= number <= hi:
            raise bad(name, f"{name} must be within [{lo}, {hi}], got {number}")
        return number

    def number(self, name: str, lo: float, hi: float) -> float | None:
        value = self.text(name)
        if value is None:
            return None
        try:
            number = float(value.strip())
        except ValueError:
            raise bad(name, f"{name} must be a number, got {value[:40]!r}", code="invalid_type") from None
        if not lo <= number <= hi:  # also refuses NaN
            raise bad(name, f"{name} must be within [{lo:g}, {hi:g}], got {value[:40]}")
        return number

    def choice(self, name: str, options: tuple[str, ...], default: str | None = None) -> str | None:
        value = self.text(name)
        if value is None:
            return default
        if value not in options:
            raise bad(name, f"{name} must be one of {', '.join(options)}; got {value[:40]!r}")
        return value

    def boolean(self, name: str) -> bool:
        value = self.text(name)
        if value is None:
            return False
        if value.lower() not in ("true", "false", "1", "0"):
            raise bad(name, f"{name} must be true or false, got {value[:40]!r}", code="invalid_type")
        return value.lower() in ("true", "1")

    async def file(self, *names: str, max_bytes: int, required: bool = False) -> Upload | None:
        """The one file sent under any of `names` (OpenAI's client sends `image` or `image[]`)."""
        values = [(n, v) for n in names for v in self.form.getlist(n)]
        if not values:
            if required:
                raise bad(names[0], f"{names[0]} is required: send it as a file part",
                          code="missing_required_parameter")
            return None
        if len(values) > 1:
            raise bad(names[0], f"send one {names[0]}; got {len(values)}", code="too_many_files")
        name, value = values[0]
        if not isinstance(value, UploadFile):
            raise bad(names[0], f"{names[0]} must be a file part (with a filename), not a text field",
                      code="invalid_type")
        if value.size is not None and value.size > max_bytes:
            raise ApiError(413, f"{names[0]} is {value.size} bytes; at most {max_bytes} are accepted",
                           param=names[0], code="image_too_large")
        data = await value.read()
        if len(data) > max_bytes:
            raise ApiError(413, f"{names[0]} is {len(data)} bytes; at most {max_bytes} are accepted",
                           param=names[0], code="image_too_large")
        if not data:
            raise bad(names[0], f"{names[0]} is empty (0 bytes); send a PNG, JPEG or WebP file")
        return Upload(names[0], value.filename or "", value.content_type or "", data)
