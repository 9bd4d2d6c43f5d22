"""Turns the images and masks callers hold (paths, bytes, PIL images, numpy arrays) into the bytes a request carries."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

# Modes PNG stores as they are; anything else (CMYK, YCbCr, 16-bit, float) is converted first.
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA"}


def image_bytes(image: ImageInput) -> bytes:
    """Bytes of a template image: files and bytes go as they are (the server validates them), pictures as PNG."""
    raw = _raw(image)
    if raw is not None:
        return raw
    if isinstance(image, Image.Image):
        return _png(image if image.mode in _PNG_MODES else image.convert("RGB"))
    if isinstance(image, np.ndarray):
        return _png(Image.fromarray(_image_array(image)))
    raise TypeError(f"an image must be a path, bytes, a PIL image or a numpy array, not {type(image).__name__}")


def mask_bytes(mask: ImageInput) -> bytes:
    """Bytes of an edit mask (white = edit): files and bytes as they are, arrays as an 'L' PNG with 255 = edit.

    PIL images keep their mode, so a mask painted in an alpha channel still reaches the server's alpha rule.
    """
    raw = _raw(mask)
    if raw is not None:
        return raw
    if isinstance(mask, Image.Image):
        if mask.mode in _PNG_MODES:
            return _png(mask)
        return _png(Image.fromarray(_mask_array(np.asarray(mask))))
    if isinstance(mask, np.ndarray):
        return _png(Image.fromarray(_mask_array(mask)))
    raise TypeError(f"a mask must be a path, bytes, a PIL image or a numpy array, not {type(mask).__name__}")


def _raw(value) -> bytes | None:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)):
        return Path(value).read_bytes()
    return None


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _check_finite(array: np.ndarray, what: str) -> None:
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ValueError(f"{what} holds NaN or infinite values")


def _image_array(array: np.ndarray) -> np.ndarray:
    """An HxW, HxWx3 or HxWx4 array as uint8: floats must lie in [0, 1], integers in [0, 255]."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"an image array must be HxW, HxWx3 or HxWx4; got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"an image array must not be empty; got shape {array.shape}")
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    _check_finite(array, "image array")
    if np.issubdtype(array.dtype, np.floating):
        if array.min() < 0 or array.max() > 1:
            raise ValueError(f"a float image must lie in [0, 1]; got values in [{array.min():g}, {array.max():g}]")
        return np.rint(array * 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise ValueError(f"an integer image must lie in [0, 255]; got values in [{array.min()}, {array.max()}]")
        return array.astype(np.uint8)
    raise ValueError(f"an image array must hold integers, floats or booleans; got dtype {array.dtype}")


def _mask_array(array: np.ndarray) -> np.ndarray:
    """A 2-D mask as uint8 0/255 (graded for floats): bool, 0/1 or 0/255 integers, or floats in [0, 1]."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != 2:
        raise ValueError(f"a mask array must be 2-D (HxW, or HxWx1); got shape {array.shape}; "
                         "pass one channel, e.g. mask[..., 0]")
    if array.size == 0:
        raise ValueError(f"a mask array must not be empty; got shape {array.shape}")
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        _check_finite(array, "mask array")
        if array.min() < 0 or array.max() > 1:
            raise ValueError(f"a float mask must lie in [0, 1] (1 = edit); got values in "
                             f"[{array.min():g}, {array.max():g}]")
        return np.rint(array * 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        values = np.unique(array)
        # Either scale is unambiguous on its own; a mix (say 0, 1 and 255) or grey levels could mean either.
        if set(values.tolist()) <= {0, 1}:
            return array.astype(np.uint8) * 255
        if set(values.tolist()) <= {0, 255}:
            return array.astype(np.uint8)
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if values.size > 6 else "")
        raise ValueError(f"an integer mask must hold only 0/1 or only 0/255 (non-zero = edit); got values {shown}; "
                         "threshold it first, e.g. (mask > 127)")
    raise ValueError(f"a mask array must hold booleans, integers or floats; got dtype {array.dtype}")
