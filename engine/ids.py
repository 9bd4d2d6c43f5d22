"""Template and request id rules: a safe character set and length, checked before an id reaches a store key.

Torch-free, so the gateway applies the same rule before forwarding a request.
"""
from __future__ import annotations

import re

from .errors import InvalidRequestIdError, InvalidTemplateIdError

#: an id starts with a letter or digit and continues with letters, digits, '.', '_' or '-' (at most 128 in all):
#: one path segment of a store key that can never climb out of its folder ('/' and a leading '.' are excluded)
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
TEMPLATE_ID_PATTERN = ID_PATTERN
REQUEST_ID_PATTERN = ID_PATTERN
ID_MAX_LENGTH = 128

_ID_RE = re.compile(ID_PATTERN)


def _check(value, kind: str, error: type, field: str) -> str:
    if not isinstance(value, str):
        raise error(f"{kind} must be a string, got {type(value).__name__}", field=field)
    if _ID_RE.fullmatch(value) is None:
        shown = value if len(value) <= 40 else value[:40] + "..."
        why = ("is empty" if not value else
               f"has {len(value)} characters; at most {ID_MAX_LENGTH} are allowed" if len(value) > ID_MAX_LENGTH else
               "must start with a letter or digit and contain only letters, digits, '.', '_' and '-'")
        raise error(f"{kind} {shown!r} {why}", field=field)
    return value


def validate_template_id(value, *, field: str = "template_id") -> str:
    """`value` if it is a valid template id, else InvalidTemplateIdError (code INVALID_TEMPLATE_ID)."""
    return _check(value, "template id", InvalidTemplateIdError, field)


def validate_request_id(value, *, field: str = "request_id") -> str:
    """`value` if it is a valid request id, else InvalidRequestIdError (code INVALID_REQUEST_ID)."""
    return _check(value, "request id", InvalidRequestIdError, field)
