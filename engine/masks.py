"""Edit masks: validation, pixel -> latent -> token mapping (any-pixel rule, optional dilation)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import EmptyMaskError, InvalidMaskError
from .latents import pack


def load_mask(mask, size: tuple[int, int], allow_empty: bool = False) -> torch.Tensor:
    """Any mask form (PIL, array, tensor; white/nonzero = edit) -> (H, W) bool, validated against `size`.

    Grey levels are thresholded at half range, as diffusers binarises inpainting masks.
    """
    if isinstance(mask, Image.Image):
        arr = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    elif isinstance(mask, torch.Tensor):
        arr = mask.detach().float().cpu().numpy()
    else:
        try:
            arr = np.asarray(mask, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InvalidMaskError(f"mask must be an image or a 2-D array, got {type(mask).__name__}") from exc
        if arr.size and arr.max() > 1.0:
            arr = arr / 255.0
    arr = np.squeeze(arr)
    if arr.ndim == 3:
        arr = arr.max(axis=-1 if arr.shape[-1] in (1, 3, 4) else 0)
    if arr.ndim != 2:
        raise InvalidMaskError(f"mask must be 2-D (height x width), got shape {tuple(arr.shape)}")
    if arr.shape != tuple(size):
        raise InvalidMaskError(
            f"mask is {arr.shape[1]}x{arr.shape[0]} (WxH) but the template is {size[1]}x{size[0]}; "
            "send a mask of the template's size"
        )
    if not np.isfinite(arr).all():
        raise InvalidMaskError("mask contains NaN or infinite values")
    binary = torch.from_numpy(arr >= 0.5)
    if not allow_empty and not bool(binary.any()):
        raise EmptyMaskError("mask selects no pixel (all black); paint the region to edit in white")
    return binary


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
        raise InvalidMaskError(f"image size must be a multiple of {2 * scale_factor} pixels; got {tuple(pixels.shape)}")
    grid = F.max_pool2d(latent, 2)
    if dilate > 0:
        grid = F.max_pool2d(grid, 2 * dilate + 1, stride=1, padding=dilate)
        latent = torch.maximum(latent, F.interpolate(grid, scale_factor=2, mode="nearest"))
    tokens = grid.flatten().bool()
    blend = pack(latent.expand(1, latent_channels, h, w).contiguous())
    return TokenMask(pixels=pixels, tokens=tokens, index=tokens.nonzero().flatten(), blend=blend)
