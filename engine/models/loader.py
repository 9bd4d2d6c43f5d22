"""Loads a model directory (a real local checkpoint or a saved preset) into an EditModel bundle."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelLoadError
from .base import LatentCodec, ModelInfo, TextEncoder
from .fingerprint import combine, directory_fingerprint, modules_fingerprint

ASSETS = Path(__file__).resolve().parent.parent / "assets"
#: the trained digits model shipped with the repository (see train_digits.py)
DIGITS_DIR = ASSETS / "digits"


@dataclass
class EditModel:
    """Everything an edit needs: transformer, a scheduler to copy per request, text encoder, latent codec."""

    transformer: torch.nn.Module
    scheduler: object
    text: TextEncoder
    codec: LatentCodec
    info: ModelInfo
    pipeline: object | None = None  # the stock diffusers pipeline, when the family has one

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def is_unet(self) -> bool:
        return self.info.family == "unet-inpaint"

    @property
    def cell(self) -> int:
        """Pixels per token side of the coarsest grid: the codec's downscale times the 2x2 packing of latents
        into tokens (Flux), or times every halving of the UNet's levels (a UNet)."""
        if self.is_unet:
            return self.codec.scale_factor * 2 ** (len(self.transformer.config.block_out_channels) - 1)
        return 2 * self.codec.scale_factor

    @property
    def num_blocks(self) -> int:
        """Cached blocks per step: Flux dual + single blocks, or a UNet's BasicTransformerBlocks."""
        if self.is_unet:
            from ..unet.ocache import self_attention_blocks

            return len(self_attention_blocks(self.transformer))
        return len(self.transformer.transformer_blocks) + len(self.transformer.single_transformer_blocks)


def fingerprint(*modules: torch.nn.Module, dtype: torch.dtype | None = None) -> str:
    """config_hash of a model built in memory: every weight of every module given (transformer, VAE, text).

    Models loaded from a directory are fingerprinted from their files instead (see fingerprint.py).
    """
    dtype = dtype or next(iter(modules)).dtype
    return combine(modules_fingerprint(*modules), str(dtype))


def _quiet_libraries() -> None:
    """Loading and prompt truncation chatter from diffusers/transformers is noise in a server log."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> EditModel:
    """Load with `from_pretrained` from a local directory; never downloads.

    A directory with `instgenie_model.json` is one of ours (a preset or the digits model); a directory with
    only diffusers' `model_index.json` is a real Flux checkpoint: FLUX.1-dev/-schnell through the inpaint blend,
    or FLUX.1-Fill-dev (its model_index names FluxFillPipeline).
    """
    _quiet_libraries()
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist")
    meta_file = path / "instgenie_model.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else None
    if meta is not None and meta.get("kind") == "digits":
        from .digits import load_digits_model

        transformer, text, codec, scheduler, _ = load_digits_model(path)
        transformer = transformer.to(device=device, dtype=dtype).eval()
        return EditModel(transformer, scheduler, text, codec, info_from_meta(meta, config_hash_of(path, dtype)))
    if (path / "model_index.json").exists():
        if _pipeline_class(path, meta) == "StableDiffusionInpaintPipeline":
            from ..unet.loader import load_unet

            return load_unet(path, meta, device, dtype)
        return _load_flux(path, meta, device, dtype)
    raise ModelLoadError(f"{str(path)!r} holds neither instgenie_model.json nor a diffusers model_index.json")


def config_hash_of(path: Path, dtype: torch.dtype) -> str:
    """Every model file's content (weights of transformer, VAE, text encoders; configs) + the run dtype."""
    return combine(directory_fingerprint(path), str(dtype))


def info_from_meta(meta: dict, config_hash: str) -> ModelInfo:
    return ModelInfo(
        model_id=meta["model_id"], family=meta.get("family", "flux"), resolution=tuple(meta["resolution"]),
        default_steps=int(meta["default_steps"]), guidance=meta.get("guidance", "none"),
        default_guidance_scale=float(meta.get("default_guidance_scale", 1.0)), config_hash=config_hash,
        extra={k: v for k, v in meta.items() if k not in ModelInfo.__dataclass_fields__},
    )


def _pipeline_class(path: Path, meta: dict | None) -> str:
    """The diffusers pipeline class a model directory was saved from (model_index.json), "" if unreadable."""
    try:
        return str(json.loads((path / "model_index.json").read_text()).get("_class_name", ""))
    except (OSError, ValueError):
        return ""


def _is_fill(path: Path, meta: dict | None) -> bool:
    """FLUX.1-Fill: our meta says so, or the checkpoint's pipeline class is FluxFillPipeline (model_index.json)."""
    if meta is not None:
        return meta.get("family") == "flux-fill"
    return _pipeline_class(path, meta) == "FluxFillPipeline"


def _load_flux(path: Path, meta: dict | None, device, dtype) -> EditModel:
    from diffusers import FluxFillPipeline, FluxInpaintPipeline

    from .flux import FluxTextEncoder, VaeCodec

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    fill = _is_fill(path, meta)
    try:
        pipe = (FluxFillPipeline if fill else FluxInpaintPipeline).from_pretrained(path, dtype=dtype,
                                                                                    local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a Flux pipeline from {str(path)!r}: {exc}") from exc
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if meta is None:  # a real checkpoint: describe it from its own config
        guidance = "distilled" if pipe.transformer.config.guidance_embeds else "none"
        # FLUX.1-Fill-dev's model card: 50 steps at guidance 30; FLUX.1-dev 28 at 3.5; schnell 4
        steps = 50 if fill else 28 if guidance == "distilled" else 4
        meta = {"model_id": path.name, "family": "flux-fill" if fill else "flux", "resolution": [1024, 1024],
                "default_steps": steps, "guidance": guidance, "default_guidance_scale": 30.0 if fill else 3.5,
                "text_tokens": 512}
    text = FluxTextEncoder(pipe, max_sequence_length=int(meta.get("text_tokens", 512)))
    pipe.transformer.eval()
    return EditModel(pipe.transformer, pipe.scheduler, text, VaeCodec(pipe.vae),
                     info_from_meta(meta, config_hash_of(path, dtype)), pipe)


def preset_model(name: str, root: str | Path | None = None, seed: int = 0, **kwargs) -> EditModel:
    """A named model: "digits" (trained, shipped) or a Flux/UNet preset built once into `root` and re-loaded."""
    if name == "digits":
        return load_model(DIGITS_DIR, **kwargs)
    from ..unet.preset import UNET_PRESETS, build_unet_preset
    from .flux import build_flux_preset

    root = Path(root or os.environ.get("INSTGENIE_MODELS", "var/models"))
    target = root / f"{name}-seed{seed}"
    if not (target / "instgenie_model.json").exists():
        (build_unet_preset if name in UNET_PRESETS else build_flux_preset)(name, target, seed=seed)
    return load_model(target, **kwargs)
