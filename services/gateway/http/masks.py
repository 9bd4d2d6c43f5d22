"""OpenAI's mask convention (fully transparent = edit) turned into the engine's (white = edit), and `size`."""
from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

from .errors import bad

_SIZE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")


def parse_size(value: str | None) -> tuple[int, int] | None:
    """(width, height) of `size`, or None for absent / "auto" (the image's own size)."""
    if value is None or value == "auto":
        return None
    m = _SIZE.match(value)
    if not m:
        raise bad("size", f"size must be WIDTHxHEIGHT (e.g. 16x16) or auto, got {value[:40]!r}")
    return int(m.group(1)), int(m.group(2))


def fit(image: Image.Image, size: tuple[int, int] | None, served: list[tuple[int, int]]) -> Image.Image:
    """The image at the requested size: as it is when the sizes agree, resized to a size some model serves,
    else 400 naming the sizes that work."""
    if size is None or size == image.size:
        return image
    if size not in served:
        listed = ", ".join(f"{w}x{h}" for w, h in sorted(set(served))) or "none right now"
        raise bad("size", f"size {size[0]}x{size[1]} is neither the image's size ({image.size[0]}x{image.size[1]}) "
                  f"nor one this server renders ({listed})", code="unsupported_size")
    return image.resize(size, Image.Resampling.LANCZOS)


def has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def edit_region(mask: Image.Image, field: str = "mask") -> np.ndarray:
    """(H, W) bool, True where OpenAI's convention edits: pixels whose alpha is exactly 0 (fully transparent).

    A mask with no alpha channel has no transparent pixel, so it cannot say what to edit in this convention;
    it is refused with a hint rather than read as white = edit, which would silently swap the meaning.
    """
    if not has_transparency(mask):
        raise bad(field, f"{field} has no alpha channel (mode {mask.mode}); OpenAI's convention edits the fully "
                  "transparent pixels of an RGBA PNG. Make the region to edit transparent", code="invalid_mask")
    alpha = np.asarray(mask.convert("RGBA"))[..., 3]
    region = alpha == 0
    if not region.any():
        raise bad(field, f"{field} has no fully transparent pixel, so nothing would be edited; make the region to "
                  "edit transparent (alpha 0)", code="empty_mask")
    return region


def engine_mask_png(region: np.ndarray) -> bytes:
    """The engine's mask for a region: a greyscale PNG, 255 = edit, 0 = keep (binary: no grey to refuse)."""
    buf = io.BytesIO()
    Image.fromarray(np.where(region, 255, 0).astype(np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
