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
    def num_blocks(self) -> int:
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
    only diffusers' `model_index.json` is a real Flux checkpoint (FLUX.1-dev/-schnell through the inpaint blend).
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
        return EditModel(transformer, scheduler, text, codec, _info(meta, _config_hash(path, dtype)))
    if (path / "model_index.json").exists():
        return _load_flux(path, meta, device, dtype)
    raise ModelLoadError(f"{str(path)!r} holds neither instgenie_model.json nor a diffusers model_index.json")


def _config_hash(path: Path, dtype: torch.dtype) -> str:
    """Every model file's content (weights of transformer, VAE, text encoders; configs) + the run dtype."""
    return combine(directory_fingerprint(path), str(dtype))


def _info(meta: dict, config_hash: str) -> ModelInfo:
    return ModelInfo(
        model_id=meta["model_id"], family=meta.get("family", "flux"), resolution=tuple(meta["resolution"]),
        default_steps=int(meta["default_steps"]), guidance=meta.get("guidance", "none"),
        default_guidance_scale=float(meta.get("default_guidance_scale", 1.0)), config_hash=config_hash,
        extra={k: v for k, v in meta.items() if k not in ModelInfo.__dataclass_fields__},
    )


def _load_flux(path: Path, meta: dict | None, device, dtype) -> EditModel:
    from diffusers import FluxInpaintPipeline

    from .flux import FluxTextEncoder, VaeCodec

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        pipe = FluxInpaintPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a Flux pipeline from {str(path)!r}: {exc}") from exc
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if meta is None:  # a real checkpoint: describe it from its own config
        guidance = "distilled" if pipe.transformer.config.guidance_embeds else "none"
        meta = {"model_id": path.name, "family": "flux", "resolution": [1024, 1024],
                "default_steps": 28 if guidance == "distilled" else 4, "guidance": guidance,
                "default_guidance_scale": 3.5, "text_tokens": 512}
    text = FluxTextEncoder(pipe, max_sequence_length=int(meta.get("text_tokens", 512)))
    pipe.transformer.eval()
    return EditModel(pipe.transformer, pipe.scheduler, text, VaeCodec(pipe.vae), _info(meta, _config_hash(path, dtype)),
                     pipe)


def preset_model(name: str, root: str | Path | None = None, seed: int = 0, **kwargs) -> EditModel:
    """A named model: "digits" (trained, shipped) or a Flux preset built once into `root` and re-loaded."""
    if name == "digits":
        return load_model(DIGITS_DIR, **kwargs)
    from .flux import build_flux_preset

    root = Path(root or os.environ.get("INSTGENIE_MODELS", "var/models"))
    target = root / f"{name}-seed{seed}"
    if not (target / "instgenie_model.json").exists():
        build_flux_preset(name, target, seed=seed)
    return load_model(target, **kwargs)
