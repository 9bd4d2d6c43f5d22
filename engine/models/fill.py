"""FLUX.1-Fill conditioning: the masked image's latents and the pixel mask, packed as extra input channels."""
from __future__ import annotations

import torch

from ..latents import pack


def mask_channels(pixels: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """(H, W) pixel mask -> (1, N, 4 s^2): each latent cell's s x s pixels as channels, packed 2x2 like latents.

    The same layout as FluxFillPipeline.prepare_mask_latents: view (h, s, w, s), channels (s, s) first.
    """
    s = scale_factor
    big_h, big_w = pixels.shape
    h, w = big_h // s, big_w // s
    m = pixels.float().view(h, s, w, s).permute(1, 3, 0, 2).reshape(1, s * s, h, w)
    return pack(m)


@torch.no_grad()
def fill_condition(codec, image: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """The Fill transformer's extra input for every token, (1, N, 4C + 4 s^2).

    `image` (1, C_img, H, W) in [-1, 1]; `pixels` (H, W) bool, True = regenerate. As FluxFillPipeline: the
    masked image is `image * (1 - mask)` (masked pixels become mid-grey 0), VAE-encoded and packed, then the
    packed mask. One departure: the masked image is encoded to the distribution's mode, not a sample, so a
    request's conditioning never depends on an encoder RNG (and the template's equals its image latents).
    """
    m = pixels.to(image.device, image.dtype)[None, None]
    masked = pack(codec.encode(image * (1 - m)))
    return torch.cat([masked, mask_channels(pixels, codec.scale_factor).to(masked.device, masked.dtype)], dim=-1)
