"""Flux latent packing (2x2 patches -> tokens), position ids and image <-> tensor conversion."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .errors import InvalidImageError
from .images import DEFAULT_LIMITS, ImageLimits, check_pixels, image_to_array


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C), identical to diffusers' FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack` for a latent grid of h x w."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """RoPE ids (N, 3) of the (h/2) x (w/2) token grid, as diffusers' `_prepare_latent_image_ids`."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def image_to_tensor(image, channels: int, limits: ImageLimits = DEFAULT_LIMITS, *, field: str = "image") -> torch.Tensor:
    """A template image -> (1, channels, H, W) float in [-1, 1].

    Encoded bytes, PIL images and integer arrays go through `images.image_to_array` (size checked from the
    header before decoding, 0..255 range, PIL's colour rules). A tensor must already be what the model takes:
    floating point, finite, within [-1, 1], shaped (C, H, W) or (1, C, H, W) with C = `channels`.
    """
    if isinstance(image, torch.Tensor):
        return _checked_tensor(image, channels, limits, field)
    arr = image_to_array(image, channels, limits, field=field)
    t = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1).unsqueeze(0)
    return t / 127.5 - 1.0


def _checked_tensor(t: torch.Tensor, channels: int, limits: ImageLimits, field: str) -> torch.Tensor:
    if not t.is_floating_point():
        raise InvalidImageError(f"an {field} tensor must be floating point in [-1, 1], got {t.dtype}", field=field)
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[0] != 1 or t.shape[1] != channels:
        raise InvalidImageError(f"an {field} tensor must be (C, H, W) or (1, C, H, W) with C = {channels}, got "
                                f"{tuple(t.shape)}", field=field)
    check_pixels(t.shape[-1], t.shape[-2], limits, field=field)
    t = t.detach().float()
    if not bool(torch.isfinite(t).all()):
        raise InvalidImageError(f"{field} contains NaN or infinite values", field=field)
    lo, hi = float(t.min()), float(t.max())
    if lo < -1.0 or hi > 1.0:
        raise InvalidImageError(f"an {field} tensor must lie in [-1, 1], got values in [{lo:g}, {hi:g}]", field=field)
    return t


def tensor_to_image(t: torch.Tensor) -> Image.Image:
    """(1, C, H, W) or (C, H, W) in [-1, 1] -> PIL image (L for one channel, RGB for three)."""
    t = t[0] if t.ndim == 4 else t
    arr = ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
