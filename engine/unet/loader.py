"""Loads a StableDiffusionInpaintPipeline directory (a preset or stable-diffusion-2-inpainting) into an EditModel."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..models.loader import EditModel, config_hash_of, info_from_meta
from .preset import ClipTextEncoder, SdVaeCodec


def load_unet(path: Path, meta: dict | None, device, dtype: torch.dtype) -> EditModel:
    """`from_pretrained` from a local directory only; a real checkpoint is described from its own config."""
    from diffusers import StableDiffusionInpaintPipeline

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        pipe = StableDiffusionInpaintPipeline.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                              safety_checker=None, feature_extractor=None,
                                                              requires_safety_checker=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a Stable Diffusion inpainting pipeline from {str(path)!r}: {exc}") from exc
    if pipe.unet.config.in_channels != 9:
        raise ModelLoadError(f"{str(path)!r} has a {pipe.unet.config.in_channels}-channel UNet; the UNet family needs "
                             "an inpainting UNet (9 channels: latents, mask, masked-image latents)")
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if meta is None:  # stable-diffusion-2-inpainting: 512 px, 50 steps, CFG 7.5 (its model card)
        meta = {"model_id": path.name, "family": "unet-inpaint", "resolution": [512, 512], "default_steps": 50,
                "guidance": "cfg", "default_guidance_scale": 7.5}
    pipe.unet.eval()
    return EditModel(pipe.unet, pipe.scheduler, ClipTextEncoder(pipe), SdVaeCodec(pipe.vae),
                     info_from_meta(meta, config_hash_of(path, dtype)), pipe)
