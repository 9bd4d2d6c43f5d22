"""Edit masks: validation (the rules of images.py), pixel -> latent -> token mapping (any-pixel rule, dilation)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InvalidMaskError
from .images import DEFAULT_LIMITS, ImageLimits, decode_image, mask_from_array, mask_from_image
from .latents import pack


def load_mask(mask, size: tuple[int, int], allow_empty: bool = False, *, field: str = "mask",
              limits: ImageLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """Any mask form -> (H, W) bool, validated against `size` with the rules of `images.py` (white = edit).

    Accepted: a PIL image, encoded image bytes, a numpy array, a torch tensor (converted to numpy, so tensors
    follow the array rules). Anything else, or a value outside its dtype's range, is InvalidMaskError.
    """
    if isinstance(mask, (bytes, bytearray, memoryview)):
        mask = decode_image(mask, limits, field=field)
    if isinstance(mask, Image.Image):
        out = mask_from_image(mask, size, allow_empty=allow_empty, limits=limits, field=field)
    elif isinstance(mask, (np.ndarray, torch.Tensor)):
        if isinstance(mask, torch.Tensor):
            if mask.is_complex():
                raise InvalidMaskError(f"{field} has dtype {mask.dtype}; send bool, integer or float values", field=field)
            mask = mask.detach().cpu()
            mask = (mask.float() if mask.is_floating_point() and mask.dtype != torch.float64 else mask).numpy()
        out = mask_from_array(mask, size, allow_empty=allow_empty, field=field)
    else:
        raise InvalidMaskError(f"{field} must be a PIL image, encoded image bytes, a numpy array or a torch tensor, "
                               f"got {type(mask).__name__}", field=field)
    return torch.from_numpy(np.ascontiguousarray(out))


@dataclass
class TokenMask:
    """Which image tokens an edit computes, and which latent values it regenerates."""

    pixels: torch.Tensor  # (H, W) bool, the user's mask
    tokens: torch.Tensor  # (N,) bool, computed tokens
    index: torch.Tensor  # (M,) long, positions of computed tokens, ascending
    blend: torch.Tensor  # (1, N, 4C) float, 1 where the latent value is regenerated, 0 where pinned

    @property
    def ratio(self) -> float:
        return float(self.tokens.float().mean())


def tokens_from_mask(pixels: torch.Tensor, scale_factor: int, latent_channels: int, dilate: int = 0) -> TokenMask:
    """Map a pixel mask to tokens: a latent cell is masked if any of its pixels is, a token if any cell is.

    `dilate` grows the token set by that many tokens in every direction; the grown tokens are regenerated
    too, which softens seams (the paste-back still keeps every pixel outside the user's mask).
    """
    m = pixels.float()[None, None]
    latent = F.max_pool2d(m, scale_factor) if scale_factor > 1 else m
    h, w = latent.shape[-2:]
    if h % 2 or w % 2:
        raise InvalidMaskError(f"image size must be a multiple of {2 * scale_factor} pixels; got {tuple(pixels.shape)}",
                               field="mask")
    grid = F.max_pool2d(latent, 2)
    if dilate > 0:
        grid = F.max_pool2d(grid, 2 * dilate + 1, stride=1, padding=dilate)
        latent = torch.maximum(latent, F.interpolate(grid, scale_factor=2, mode="nearest"))
    tokens = grid.flatten().bool()
    blend = pack(latent.expand(1, latent_channels, h, w).contiguous())
    return TokenMask(pixels=pixels, tokens=tokens, index=tokens.nonzero().flatten(), blend=blend)
