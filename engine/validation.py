"""The engine's one validation layer for scalar request fields: exact types and ranges, typed errors, no coercion.

Every check raises an InvalidInputError subclass naming the field (`.field`) and what to send instead. Values
of the wrong type are refused, never converted: 2.5 steps, a float seed, a string guidance scale or 1 for a
flag all fail. numpy integer/float scalars count as integers/floats (they carry no ambiguity).
Torch-free: the gateway may run the same checks before forwarding.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from .errors import (
    InvalidDilateError, InvalidGuidanceError, InvalidInputError, InvalidPromptError, InvalidSeedError,
    InvalidStepsError,
)

#: denoising steps a template may be registered with
MAX_STEPS = 200
#: seeds are 64-bit unsigned, as torch.Generator.manual_seed takes them
SEED_MAX = 2 ** 64 - 1
GUIDANCE_RANGE = (0.0, 50.0)
MAX_DILATE = 8
MAX_PROMPT_CHARS = 2000
#: how an edit computes each step: the mask-aware path, its dense oracle, or a full recompute without cache
EDIT_PATHS = ("sparse", "dense", "full")
#: "kv" and "y": Flux transformer caches; "o": UNet self-attention outputs (unet/ocache.py)
CACHE_MODES = ("kv", "y", "o")


def is_int(value) -> bool:
    """An integer that is not a bool (True is an int in Python, but never a meaningful count or seed)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value) -> bool:
    """A real number that is not a bool (ints, floats, numpy scalars)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def validate_steps(value, *, allow_none: bool = True, field: str = "steps") -> int | None:
    if value is None and allow_none:
        return None
    if not is_int(value):
        raise InvalidStepsError(f"steps must be an integer within [1, {MAX_STEPS}], got {type(value).__name__} "
                                f"{_shown(value)}", field=field)
    if not 1 <= value <= MAX_STEPS:
        raise InvalidStepsError(f"steps must be within [1, {MAX_STEPS}], got {value}", field=field)
    return int(value)


def validate_seed(value, *, field: str = "seed") -> int:
    if not is_int(value):
        raise InvalidSeedError(f"seed must be an integer within [0, 2**64 - 1], got {type(value).__name__} "
                               f"{_shown(value)}", field=field)
    if not 0 <= value <= SEED_MAX:
        raise InvalidSeedError(f"seed must be within [0, 2**64 - 1], got {_shown(value)}", field=field)
    return int(value)


def validate_guidance(value, *, field: str = "guidance_scale") -> float | None:
    if value is None:
        return None
    lo, hi = GUIDANCE_RANGE
    if not is_real(value):
        raise InvalidGuidanceError(f"guidance_scale must be a number within [{lo:g}, {hi:g}], got "
                                   f"{type(value).__name__} {_shown(value)}", field=field)
    scale = float(value)
    if not math.isfinite(scale) or not lo <= scale <= hi:
        raise InvalidGuidanceError(f"guidance_scale must be within [{lo:g}, {hi:g}], got {scale}", field=field)
    return scale


def validate_dilate(value, *, field: str = "dilate") -> int:
    if not is_int(value) or not 0 <= value <= MAX_DILATE:
        raise InvalidDilateError(f"dilate must be an integer within [0, {MAX_DILATE}] tokens, got {_shown(value)}",
                                 field=field)
    return int(value)


def validate_prompt(value, *, field: str = "prompt") -> str:
    if not isinstance(value, str):
        raise InvalidPromptError(f"prompt must be a string, got {type(value).__name__}", field=field)
    if len(value) > MAX_PROMPT_CHARS:
        raise InvalidPromptError(f"prompt has {len(value)} characters; at most {MAX_PROMPT_CHARS} are accepted",
                                 field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidPromptError(f"prompt is not valid Unicode text ({exc.reason} at {exc.start})", field=field) from None
    if "\x00" in value:
        raise InvalidPromptError("prompt contains a NUL character", field=field)
    return value


def validate_choice(value, choices: tuple[str, ...], *, field: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InvalidInputError(f"{field} must be one of {choices}, got {_shown(value)}", field=field)
    return value


def validate_flag(value, *, field: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidInputError(f"{field} must be a bool, got {type(value).__name__} {_shown(value)}", field=field)
    return bool(value)


def validate_deadline(value, *, field: str = "deadline") -> float | None:
    if value is None:
        return None
    if not is_real(value) or not math.isfinite(float(value)):
        raise InvalidInputError(f"deadline must be a finite time.monotonic() value or None, got {_shown(value)}",
                                field=field)
    return float(value)
