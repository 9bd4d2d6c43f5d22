"""Checks on every public request before any work is queued; each refusal names the field and what to do.

Model-specific checks (a prompt the model cannot encode) happen on the worker during pre-processing, before
the request joins a batch, and come back with the same INVALID_ARGUMENT shape.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from instgenie.engine.images import ImageLimits, decode_image, mask_from_image, mask_tokens

from ..common.status import invalid

REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TEMPLATE_ID = re.compile(r"^tpl-[0-9a-f]{20}$")
OPERATION = re.compile(r"^operations/(tpl-[0-9a-f]{20})$")
#: control characters other than tab and newline have no place in a prompt or a name
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
MAX_SEED = 2 ** 63 - 1


@dataclass(frozen=True)
class Limits:
    image: ImageLimits = ImageLimits()
    max_prompt_chars: int = 2000
    max_name_chars: int = 200
    max_guidance: float = 50.0
    max_dilate: int = 8
    max_page_size: int = 1000
    #: a mask where more than this share of pixels is grey (neither near-black nor near-white) is refused:
    #: anti-aliased brush edges are a few percent, a photograph sent as the mask is most of it
    max_grey_fraction: float = 0.25


def check_request_id(value: str, field: str = "request_id") -> None:
    if value and not REQUEST_ID.match(value):
        raise invalid(field, f"{field} must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a "
                      f"letter or digit; got {_show(value)}")


def check_template_id(value: str, field: str = "template_id") -> None:
    if not value:
        raise invalid(field, f"{field} is required")
    if not TEMPLATE_ID.match(value):
        raise invalid(field, f"{field} {_show(value)} is not a template id (they look like tpl-0123456789abcdef0123)")


def template_of_operation(name: str) -> str:
    m = OPERATION.match(name or "")
    if not m:
        raise invalid("name", f"operation name {_show(name)} is not one of ours (operations/tpl-...)")
    return m.group(1)


def check_text(value: str, field: str, limit: int) -> None:
    if len(value) > limit:
        raise invalid(field, f"{field} has {len(value)} characters; at most {limit} are accepted")
    if _CONTROL.search(value):
        raise invalid(field, f"{field} contains control characters (e.g. NUL); send plain text")


def check_guidance(value: float | None, limits: Limits) -> None:
    if value is None:
        return
    if not math.isfinite(value) or not 0.0 <= value <= limits.max_guidance:
        raise invalid("guidance_scale", f"guidance_scale must be a finite number within [0, {limits.max_guidance:g}], "
                      f"got {value}")


def check_seed(value: int) -> None:
    if not 0 <= value <= MAX_SEED:
        raise invalid("seed", f"seed must be within [0, 2^63-1], got {value}")


def check_steps(value: int, max_steps: int, field: str = "steps") -> None:
    if value < 0 or value > max_steps:
        raise invalid(field, f"{field} must be 0 (the default) or within [1, {max_steps}], got {value}")


def check_dilate(value: int, limits: Limits) -> None:
    if not 0 <= value <= limits.max_dilate:
        raise invalid("dilate", f"dilate must be within [0, {limits.max_dilate}] tokens, got {value}")


def check_page(page_size: int, limits: Limits) -> int:
    if page_size < 0 or page_size > limits.max_page_size:
        raise invalid("page_size", f"page_size must be within [0, {limits.max_page_size}] (0: 50), got {page_size}")
    return page_size or 50


def check_image(data: bytes, limits: Limits, field: str = "image"):
    """Decode an uploaded image (size from the header first: decompression bombs never decode)."""
    if not data:
        raise invalid(field, f"{field} is empty: send PNG, JPEG or WebP bytes")
    return decode_image(data, limits.image, field=field)


#: the family whose tokens are latent cells (Flux packs 2x2 cells into one token)
UNET_FAMILY = "unet-inpaint"


def token_pack(model) -> int:
    """Latent cells per token side of a worker.v1.ModelInfo: 1 for a UNet, 2 for Flux (and unknown families)."""
    return 1 if model.family == UNET_FAMILY else 2


def template_tokens(model, width: int, height: int) -> int:
    """Image tokens of a width x height template of `model`, which the cost model counts its FLOPs at."""
    px = max(1, model.scale_factor) * token_pack(model)
    return (width // px) * (height // px)


def check_mask(data: bytes, width: int, height: int, scale_factor: int, dilate: int, limits: Limits,
               pack: int = 2):
    """(bool mask (H, W), masked tokens per step) of an edit's mask, or INVALID_ARGUMENT saying what is wrong.
    `pack`: latent cells per token side (`token_pack`)."""
    if not data:
        raise invalid("mask", "mask is empty: send a PNG of the template's size, white = edit")
    image = decode_image(data, limits.image, field="mask")
    if image.size != (width, height):
        raise invalid("mask", f"mask is {image.size[0]}x{image.size[1]} but the template is {width}x{height}; "
                      "send a mask of the template's size")
    # The engine's rules first: they refuse modes and value ranges that are no mask at all.
    mask = mask_from_image(image, (height, width), limits=limits.image, field="mask")
    grey = _grey_fraction(image)
    if grey > limits.max_grey_fraction:
        raise invalid("mask", f"mask is not black and white: {grey:.0%} of its pixels are grey. Send white "
                      "(edit) and black (keep) pixels only; did you send the image instead of its mask?")
    if not mask.any():
        raise invalid("mask", "mask selects no pixel (all black or fully transparent); paint the region to edit "
                      "in white", reason="EMPTY_MASK")
    return mask, mask_tokens(mask, scale_factor, dilate, pack)


#: 8-bit modes whose grey levels mean something; others (1, F, I, I;16) are judged by the engine's rules alone
_GREY_MODES = ("L", "LA", "RGB", "RGBA", "RGBX", "P", "PA")


def _grey_fraction(image) -> float:
    """Share of pixels that are neither near-black nor near-white, in the channel the mask is read from."""
    if image.mode not in _GREY_MODES:
        return 0.0
    rgba = image.convert("RGBA") if image.mode in ("LA", "RGBA", "P", "PA") else None
    if rgba is not None:
        alpha = np.asarray(rgba)[..., 3]
        if alpha.min() != alpha.max():
            return float(((alpha > 16) & (alpha < 239)).mean())
    values = np.asarray(image.convert("L"))
    return float(((values > 16) & (values < 239)).mean()) if values.size else 0.0


def _show(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")
