"""Image and mask conventions at the engine boundary: bounded decoding, strict value rules, token counting.

Torch-free (PIL, numpy, stdlib): the gateway decodes and checks uploads with exactly the rules the engine
applies, without loading a model stack. The engine (`Editor`, `masks.load_mask`) calls these functions, so
there is one implementation of each convention.

Mask convention: white / non-zero = edit.
  * modes 1, L, P, RGB (and other colour modes): luminance >= half range (128 of 255);
  * LA, RGBA, PA whose alpha is not constant: alpha >= 128 marks the edit region (strokes painted on a
    transparent canvas, as a browser canvas exports them); with constant alpha, the luminance rule;
  * F (float) masks must lie in [0, 1] (>= 0.5 is edit); I (32-bit) masks in 0..255; I;16 masks use half of
    the 16-bit range; anything else is an error, never an empty mask;
  * arrays: bool as is; integers must lie in 0..255 (>= 128); floats in [0, 1] (>= 0.5); (H, W, C) integer
    arrays follow the image rules above for C = 2 (LA), 3 (RGB), 4 (RGBA).
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import EmptyMaskError, ImageTooLargeError, InvalidImageError, InvalidMaskError

#: formats an upload may use; others (EPS, which would start Ghostscript; exotic raster formats) are refused
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
#: modes read as 8-bit colour or grey
_COLOUR_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
#: what a decoder raises on a truncated or corrupt file
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on one uploaded image, checked before anything is decoded."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    formats: tuple[str, ...] = ALLOWED_FORMATS

    def __post_init__(self):
        for name in ("max_bytes", "max_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ImageLimits.{name} must be a positive integer, got {value!r}")


DEFAULT_LIMITS = ImageLimits()


def check_pixels(width: int, height: int, limits: ImageLimits = DEFAULT_LIMITS, *, field: str = "image",
                 error: type = InvalidImageError) -> None:
    """Refuse a canvas with no pixels or more pixels than `limits.max_pixels` (from a header: nothing decoded)."""
    if width < 1 or height < 1:
        raise error(f"{field} has no pixels ({width}x{height})", field=field)
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(
            f"{field} is {width}x{height} = {width * height} pixels; at most {limits.max_pixels} are accepted "
            "(the size is read from the header and the image was not decoded)", field=field)


def decode_image(data, limits: ImageLimits = DEFAULT_LIMITS, *, field: str = "image") -> Image.Image:
    """Encoded bytes -> a fully decoded PIL image, within `limits`.

    The byte length is checked first, then the canvas size from the header (a decompression bomb is refused
    before any pixel is inflated), then the image is decoded in full so that a truncated file fails here with
    InvalidImageError rather than later inside the engine.
    """
    error = InvalidMaskError if field == "mask" else InvalidImageError
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise error(f"{field} must be encoded image bytes, got {type(data).__name__}", field=field)
    size = memoryview(data).nbytes
    if size == 0:
        raise error(f"{field} is empty (0 bytes); send a PNG or JPEG", field=field)
    if size > limits.max_bytes:
        raise ImageTooLargeError(f"{field} is {size} bytes; at most {limits.max_bytes} are accepted", field=field)
    try:
        img = Image.open(io.BytesIO(bytes(data)), formats=list(limits.formats))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"{field} declares too many pixels: {exc}", field=field) from None
    except UnidentifiedImageError:
        raise error(f"{field} is not a readable image of the accepted formats {list(limits.formats)}",
                    field=field) from None
    except _DECODE_ERRORS as exc:
        raise error(f"{field} cannot be read: {exc}", field=field) from None
    check_pixels(*img.size, limits, field=field, error=error)
    _load(img, field, error)
    return img


def _load(img: Image.Image, field: str, error: type) -> None:
    """Decode a lazily opened image in full; a truncated or corrupt file is the caller's input error."""
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"{field} declares too many pixels: {exc}", field=field) from None
    except _DECODE_ERRORS as exc:
        raise error(f"{field} is truncated or corrupt and cannot be decoded: {exc}", field=field) from None


def _size_error(kind: str, got_hw: tuple[int, int], want_hw: tuple[int, int], field: str, error: type):
    return error(f"{kind} is {got_hw[1]}x{got_hw[0]} (WxH) but the template is {want_hw[1]}x{want_hw[0]}; "
                 f"send a {kind} of the template's size", field=field)


# ----------------------------------------------------------------------------------------------------- masks
def mask_from_image(img: Image.Image, size: tuple[int, int] | None = None, *, allow_empty: bool = True,
                    limits: ImageLimits = DEFAULT_LIMITS, field: str = "mask") -> np.ndarray:
    """A PIL mask -> (H, W) bool, True where the edit goes (see the module docstring for the rules).

    `size` is the expected (height, width); with `allow_empty=False` a mask selecting nothing raises
    EmptyMaskError.
    """
    if not isinstance(img, Image.Image):
        raise InvalidMaskError(f"{field} must be a PIL image here, got {type(img).__name__}", field=field)
    check_pixels(*img.size, limits, field=field, error=InvalidMaskError)
    _load(img, field, InvalidMaskError)
    return _finish_mask(_pil_mask(img, field), size, allow_empty, field)


def _pil_mask(img: Image.Image, field: str) -> np.ndarray:
    mode = img.mode
    if mode == "1":
        out = np.asarray(img, dtype=bool)
    elif mode in _COLOUR_MODES and not (mode == "P" and "transparency" in img.info):
        out = np.asarray(img.convert("L")) >= 128
    elif mode in _ALPHA_MODES or mode == "P":
        alpha = np.asarray(img.convert("RGBA"))[..., 3]
        out = alpha >= 128 if alpha.min() != alpha.max() else np.asarray(img.convert("L")) >= 128
    elif mode == "F":
        out = _float_mask(np.asarray(img, dtype=np.float32), field)
    elif mode == "I":
        out = _int_mask(np.asarray(img, dtype=np.int64), field)
    elif mode.startswith("I;16"):
        out = np.asarray(img).astype(np.int64) >= 32768  # half of the 16-bit range
    else:
        raise InvalidMaskError(f"{field} has image mode {mode!r}, which is not a mask mode; send a grey (L), "
                               "black/white (1), RGB or RGBA PNG", field=field)
    return out


def mask_from_array(arr: np.ndarray, size: tuple[int, int] | None = None, *, allow_empty: bool = True,
                    field: str = "mask") -> np.ndarray:
    """A numpy mask -> (H, W) bool: bool as is, integers in 0..255 (>= 128), floats in [0, 1] (>= 0.5)."""
    if not isinstance(arr, np.ndarray):
        raise InvalidMaskError(f"{field} must be a numpy array here, got {type(arr).__name__}", field=field)
    if arr.dtype.kind not in "buif":
        raise InvalidMaskError(f"{field} has dtype {arr.dtype}; send bool, integer (0..255) or float ([0, 1]) values",
                               field=field)
    while arr.ndim > 2 and arr.shape[0] == 1:  # (1, H, W) and (1, 1, H, W) as tensors come
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] in (2, 3, 4):
        if arr.dtype.kind not in "ui":
            raise InvalidMaskError(f"a {arr.dtype} {field} must be 2-D (height x width); only integer 0..255 "
                                   f"masks may have channels, got shape {tuple(arr.shape)}", field=field)
        _int_mask(arr, field)  # range check only
        # uint8 (H, W, C) becomes LA / RGB / RGBA: the image rules apply, alpha strokes included
        img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))
        return _finish_mask(_pil_mask(img, field), size, allow_empty, field)
    if arr.ndim != 2:
        raise InvalidMaskError(f"{field} must be 2-D (height x width), or (height x width x channels) with 1-4 "
                               f"channels, got shape {tuple(arr.shape)}", field=field)
    if arr.dtype.kind == "b":
        out = arr.astype(bool, copy=False)
    elif arr.dtype.kind == "f":
        out = _float_mask(arr, field)
    else:
        out = _int_mask(arr, field)
    return _finish_mask(np.ascontiguousarray(out), size, allow_empty, field)


def _float_mask(arr: np.ndarray, field: str) -> np.ndarray:
    if arr.size and not np.isfinite(arr).all():
        raise InvalidMaskError(f"{field} contains NaN or infinite values", field=field)
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise InvalidMaskError(
            f"a float {field} must lie in [0, 1] (1 = edit), got values in [{float(arr.min()):g}, "
            f"{float(arr.max()):g}]; divide a 0-255 mask by 255 or send it as uint8", field=field)
    return arr >= 0.5


def _int_mask(arr: np.ndarray, field: str) -> np.ndarray:
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
        raise InvalidMaskError(f"an integer {field} must lie in 0..255 (255 = edit), got values in "
                               f"[{int(arr.min())}, {int(arr.max())}]", field=field)
    return arr >= 128


def _finish_mask(mask: np.ndarray, size, allow_empty: bool, field: str) -> np.ndarray:
    if size is not None and mask.shape != tuple(size):
        raise _size_error("mask", mask.shape, tuple(size), field, InvalidMaskError)
    if not allow_empty and not mask.any():
        raise EmptyMaskError(f"{field} selects no pixel (all black, or an integer 0/1 mask read on the 0..255 "
                             "scale); paint the region to edit in white", field=field)
    return mask


def mask_tokens(mask: np.ndarray, scale_factor: int, dilate: int = 0, pack: int = 2) -> int:
    """Tokens an edit computes for `mask` (the any-pixel rule, then `dilate` tokens of growth): packed
    `pack` x `pack` latent cells, 2 for Flux; 1 for a UNet, whose tokens are its latent cells.

    The same count as `masks.tokens_from_mask(...).tokens.sum()` (Flux) and `unet.editor.latent_mask(...)`
    (a UNet), without torch: the scheduler's cost model uses it to price a request before it reaches a worker.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise InvalidMaskError(f"mask must be 2-D, got shape {tuple(m.shape)}", field="mask")
    s = int(scale_factor)
    h, w = m.shape[0] // s, m.shape[1] // s
    if h % pack or w % pack:
        raise InvalidMaskError(f"image size must be a multiple of {pack * s} pixels; got {tuple(m.shape)}",
                               field="mask")
    latent = m[:h * s, :w * s].reshape(h, s, w, s).any(axis=(1, 3))
    grid = latent.reshape(h // pack, pack, w // pack, pack).any(axis=(1, 3))
    return int(dilate_grid(grid, dilate).sum())


def dilate_grid(grid: np.ndarray, radius: int) -> np.ndarray:
    """Grow a bool grid by `radius` cells in every direction (a square window, like a max-pool)."""
    if radius <= 0:
        return grid
    out = grid
    for axis in (0, 1):  # a square window is separable: rows, then columns
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in range(2)])
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for shift in range(2 * radius + 1):
            acc |= np.take(padded, np.arange(shift, shift + n), axis=axis)
        out = acc
    return out


# ---------------------------------------------------------------------------------------------------- images
def image_to_array(image, channels: int, limits: ImageLimits = DEFAULT_LIMITS, *, field: str = "image") -> np.ndarray:
    """A template image (encoded bytes, PIL image, or uint8-range integer array) -> (H, W, channels) uint8.

    Refused, never guessed: float arrays (0..1 and 0..255 cannot be told apart; send uint8, or a torch tensor
    in [-1, 1] to the engine), integers outside 0..255, 16-bit / float PIL modes, channel counts other than
    1-4. Colour is converted with PIL's rules (RGB -> L with ITU-R 601 weights; alpha is dropped).
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = decode_image(image, limits, field=field)
    if isinstance(image, np.ndarray):
        image = _array_image(image, limits, field)
    if not isinstance(image, Image.Image):
        raise InvalidImageError(f"{field} must be encoded image bytes, a PIL image, a uint8 array or a tensor in "
                                f"[-1, 1], got {type(image).__name__}", field=field)
    check_pixels(*image.size, limits, field=field)
    _load(image, field, InvalidImageError)
    if image.mode not in _COLOUR_MODES + _ALPHA_MODES:
        raise InvalidImageError(f"{field} has image mode {image.mode!r} (16-bit, 32-bit or float); send an 8-bit "
                                "grey or RGB image", field=field)
    arr = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    return arr[..., None] if arr.ndim == 2 else arr


def _array_image(arr: np.ndarray, limits: ImageLimits, field: str) -> Image.Image:
    if arr.dtype.kind == "f":
        raise InvalidImageError(f"{field} is a {arr.dtype} array: [0, 1] and [0, 255] cannot be told apart; send "
                                "uint8 values in 0..255 (or a torch tensor in [-1, 1])", field=field)
    if arr.dtype.kind not in "ui":
        raise InvalidImageError(f"{field} has dtype {arr.dtype}; send uint8 values in 0..255", field=field)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (2, 3, 4))):
        raise InvalidImageError(f"{field} must be (height, width) or (height, width, channels) with 1-4 channels, "
                                f"got shape {tuple(arr.shape)}", field=field)
    check_pixels(arr.shape[1], arr.shape[0], limits, field=field)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
        raise InvalidImageError(f"{field} values must lie in 0..255, got [{int(arr.min())}, {int(arr.max())}]",
                                field=field)
    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))  # L, LA, RGB or RGBA by channel count


def check_image_size(hw: tuple[int, int], want_hw: tuple[int, int], *, field: str = "image",
                     hint: str = "resize it first") -> None:
    """InvalidImageError unless an image of (height, width) `hw` has the model's size `want_hw`."""
    if tuple(hw) != tuple(want_hw):
        raise InvalidImageError(f"{field} is {hw[1]}x{hw[0]} but the model serves {want_hw[1]}x{want_hw[0]}; {hint}",
                                field=field)
