"""Flux latent packing (2x2 patches -> tokens), position ids and image <-> tensor conversion."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


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


def image_to_tensor(image: Image.Image | np.ndarray | torch.Tensor, channels: int) -> torch.Tensor:
    """A PIL image / HxW(xC) uint8 array / tensor in [-1,1] -> (1, channels, H, W) float in [-1, 1]."""
    if isinstance(image, torch.Tensor):
        t = image.float()
        return t if t.ndim == 4 else t.unsqueeze(0)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] != channels:
        arr = arr[..., :1].repeat(channels, -1) if arr.shape[-1] == 1 else arr.mean(-1, keepdims=True)
    t = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1).unsqueeze(0)
    return t / 127.5 - 1.0


def tensor_to_image(t: torch.Tensor) -> Image.Image:
    """(1, C, H, W) or (C, H, W) in [-1, 1] -> PIL image (L for one channel, RGB for three)."""
    t = t[0] if t.ndim == 4 else t
    arr = ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
