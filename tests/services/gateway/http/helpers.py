"""Plain-HTTP helpers for the gateway's HTTP front: multipart bodies, JSON calls, server-sent events, masks."""
from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
import uuid

import numpy as np
from PIL import Image

from tests.services.mesh_helpers import TENANTS, digit


def multipart(fields: dict) -> tuple[bytes, str]:
    """Encode {name: str | (filename, bytes) | list of those} as multipart/form-data; returns (body, type)."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, values in fields.items():
        for value in values if isinstance(values, list) else [values]:
            out.write(f"--{boundary}\r\n".encode())
            if isinstance(value, tuple):
                filename, data = value
                out.write(f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                          "Content-Type: image/png\r\n\r\n".encode())
                out.write(data)
            else:
                out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode())
            out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def call(base: str, method: str, path: str, *, tenant: str | None = "alpha", key: str | None = None,
         fields: dict | None = None, body: bytes | None = None, content_type: str | None = None,
         timeout: float = 120) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request; HTTP errors are answers here, not exceptions."""
    headers = {}
    if key is not None:
        headers["Authorization"] = key
    elif tenant is not None:
        headers["Authorization"] = f"Bearer {TENANTS[tenant]}"
    if fields is not None:
        body, content_type = multipart(fields)
    if content_type:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(base + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def call_json(base: str, method: str, path: str, **kwargs) -> tuple[int, dict, dict]:
    status, headers, body = call(base, method, path, **kwargs)
    return status, headers, json.loads(body) if body else {}


def events(raw: bytes) -> list[tuple[str, dict]]:
    """Server-sent events of a whole response body: [(event type, data), ...] (comments dropped)."""
    out = []
    for block in raw.decode().split("\n\n"):
        kind, data = "message", []
        for line in block.splitlines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            out.append((kind, json.loads("\n".join(data))))
    return out


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def unique_digit(label: int = 6) -> np.ndarray:
    """A real digit with one corner pixel set at random, so that no other test registered this content."""
    image = digit(label, index=2).copy()
    image[0, 0] = np.random.default_rng().integers(0, 256)
    return image


def openai_mask(edit: np.ndarray) -> bytes:
    """OpenAI's convention: an RGBA PNG whose fully transparent pixels (alpha 0) are edited."""
    rgba = np.zeros((*edit.shape, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(edit, 0, 255)
    return png(rgba, "RGBA")


def right_half(size: int = 16) -> np.ndarray:
    edit = np.zeros((size, size), dtype=bool)
    edit[:, size // 2:] = True
    return edit
