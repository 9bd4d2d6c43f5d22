"""The trained "digits" model: 16x16 pixel-space Flux DiT conditioned on a digit label, with data and a judge."""
from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..errors import InvalidImageError, InvalidPromptError, ModelLoadError
from .base import TextEmbeddings

#: pixels per side of the images the model generates (sklearn's 8x8 digits upsampled 2x)
RESOLUTION = 16
#: width of the label embedding: both the single "text" token and the pooled vector
LABEL_DIM = 32

#: FluxTransformer2DModel config. One pixel channel packed 2x2 -> 4 channels per token, 64 tokens for 16x16.
DIGITS_TRANSFORMER_CONFIG: dict = dict(
    patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=4,
    joint_attention_dim=LABEL_DIM, pooled_projection_dim=LABEL_DIM, guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),  # must sum to attention_head_dim
)

#: FlowMatchEulerDiscreteScheduler config; a static shift because every request has the same 64 tokens
DIGITS_SCHEDULER_CONFIG: dict = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)

#: what instgenie_model.json says about the model (loader.load_model reads it)
DIGITS_MODEL_META: dict = {
    "kind": "digits", "model_id": "digits-16px", "family": "flux", "resolution": [RESOLUTION, RESOLUTION],
    "default_steps": 20, "guidance": "cfg", "default_guidance_scale": 2.0,
}

#: every TEST_EVERY-th image of sklearn's digits is in the test split, the rest in train. An interleaved rule
#: rather than "the last N": the tail of the data set comes from other writers and makes a skewed test set.
TEST_EVERY = 6


# ------------------------------------------------------------------------------------------------ conditioning
class LabelEmbedder(ModelMixin, ConfigMixin):
    """A learned embedding per digit label; row `num_labels` is the null label (unconditional branch of CFG)."""

    @register_to_config
    def __init__(self, num_labels: int = 10, dim: int = LABEL_DIM, seq_len: int = 1):
        super().__init__()
        self.embedding = nn.Embedding(num_labels + 1, dim * seq_len)

    @property
    def null_label(self) -> int:
        return self.config.num_labels

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """labels (B,) int -> token embeddings (B, seq_len, dim) and pooled vector (B, dim)."""
        tokens = self.embedding(labels).view(labels.shape[0], self.config.seq_len, self.config.dim)
        return tokens, tokens.mean(dim=1)


class DigitsTextEncoder:
    """TextEncoder for the digits model: the prompt is one digit "0".."9"; "" is the unconditional prompt."""

    def __init__(self, embedder: LabelEmbedder):
        self.embedder = embedder

    def labels(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> label ids (B,); raises InvalidPromptError naming the offending prompt."""
        out = []
        for p in prompts:
            text = p.strip() if isinstance(p, str) else None
            if text == "":
                out.append(self.embedder.null_label)
            elif text is not None and len(text) == 1 and text in "0123456789":
                out.append(int(text))
            else:
                raise InvalidPromptError(
                    f"the digits model takes a single digit 0-9 as prompt (or '' for none), got {p!r}", field="prompt")
        return torch.tensor(out, dtype=torch.long, device=self.embedder.device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextEmbeddings:
        tokens, pooled = self.embedder(self.labels(prompts))
        text_ids = torch.zeros(self.embedder.config.seq_len, 3, device=tokens.device, dtype=tokens.dtype)
        return TextEmbeddings(tokens, pooled, text_ids)


# ------------------------------------------------------------------------------------------------ latent codec
class PixelCodec:
    """LatentCodec of a pixel-space model: latents are the grayscale pixels in [-1, 1] themselves.

    `encode` also accepts RGB input (B, 3, H, W) and converts it to luminance with the ITU-R 601 weights
    (the same as PIL's "L" conversion), so a colour template works on this grayscale model.
    """

    scale_factor = 1
    latent_channels = 1
    image_channels = 1
    _LUMA = (0.299, 0.587, 0.114)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise InvalidImageError(
                f"the digits model takes (B, 1, H, W) grayscale or (B, 3, H, W) RGB images, got {tuple(images.shape)}",
                field="image")
        if images.shape[1] == 3:
            weights = torch.tensor(self._LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
            return (images * weights).sum(dim=1, keepdim=True)
        return images.clone()  # a copy: the caller may update latents in place

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1.0, 1.0)


# ------------------------------------------------------------------------------------------------ data
@functools.lru_cache(maxsize=None)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1797 8x8 digits (0..16, white digit on black) and labels; shipped in the wheel, no download."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


def _split_indices(split: str) -> np.ndarray:
    n = len(_sklearn_digits()[1])
    is_test = np.arange(n) % TEST_EVERY == TEST_EVERY - 1
    if split == "train":
        return np.flatnonzero(~is_test)
    if split == "test":
        return np.flatnonzero(is_test)
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def load_digits_8x8(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The raw 8x8 images (N, 8, 8) in sklearn's 0..16 range and labels (N,) of a split."""
    images, labels = _sklearn_digits()
    idx = _split_indices(split)
    return images[idx], labels[idx]


def load_digits_dataset(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 16, 16) in [-1, 1] and labels (N,) of "train" (1498) or "test" (299, every 6th image).

    The 8x8 digits are upsampled bilinearly; 16 (sklearn's maximum intensity) maps to 1, 0 to -1.
    """
    images, labels = load_digits_8x8(split)
    x = torch.from_numpy(images).unsqueeze(1) / 8.0 - 1.0
    x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
    return x.clamp(-1.0, 1.0), torch.from_numpy(labels)


# ------------------------------------------------------------------------------------------------ judge
@functools.lru_cache(maxsize=None)
def digit_classifier():
    """An RBF SVC fitted on the real 8x8 train split (about 99% on the test split); built once per process."""
    from sklearn.svm import SVC

    images, labels = load_digits_8x8("train")
    return SVC(gamma=0.001, C=10.0).fit(images.reshape(len(images), -1), labels)


def classify(images16: torch.Tensor) -> np.ndarray:
    """Predicted digit of each 16x16 image in [-1, 1] ((N, 1, 16, 16) or (N, 16, 16)).

    The image goes back to 8x8 by 2x2 averaging and to sklearn's 0..16 range, where the classifier was fitted.
    """
    x = images16.detach().float().cpu()
    x = x.unsqueeze(1) if x.ndim == 3 else x
    x8 = F.avg_pool2d(x, 2).clamp(-1.0, 1.0)
    features = ((x8 + 1.0) * 8.0).reshape(len(x8), -1).numpy()
    return digit_classifier().predict(features)


# ------------------------------------------------------------------------------------------------ sampling
@torch.no_grad()
def sample_digits(transformer, text: DigitsTextEncoder, scheduler, prompts: list[str], steps: int = 20,
                  guidance_scale: float = 2.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Generate one image per prompt with Euler steps and true CFG; returns (B, 1, 16, 16) in [-1, 1].

    The transformer is called exactly as diffusers' Flux pipelines call it (packed latents, timestep t/1000).
    `scheduler` is copied, so the caller's instance keeps no per-call state.
    """
    from diffusers import FluxPipeline

    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps)
    b, device, dtype = len(prompts), transformer.device, transformer.dtype
    n = RESOLUTION // 2  # packed token grid side
    cond, uncond = text.encode(list(prompts)), text.encode([""] * b)
    embeds = torch.cat([uncond.prompt_embeds, cond.prompt_embeds]).to(dtype)
    pooled = torch.cat([uncond.pooled, cond.pooled]).to(dtype)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, n, n, device, dtype)
    noise = torch.randn((b, 1, RESOLUTION, RESOLUTION), generator=generator, dtype=torch.float32)
    latents = FluxPipeline._pack_latents(noise.to(device, dtype), b, 1, RESOLUTION, RESOLUTION)
    for t in sched.timesteps:
        velocity = transformer(hidden_states=torch.cat([latents, latents]), timestep=(t / 1000).expand(2 * b).to(dtype),
                               pooled_projections=pooled, encoder_hidden_states=embeds,
                               txt_ids=uncond.text_ids.to(dtype), img_ids=img_ids, return_dict=False)[0]
        v_uncond, v_cond = velocity.chunk(2)
        latents = sched.step(v_uncond + guidance_scale * (v_cond - v_uncond), t, latents, return_dict=False)[0]
    return FluxPipeline._unpack_latents(latents, RESOLUTION, RESOLUTION, 1).clamp(-1.0, 1.0)


# ------------------------------------------------------------------------------------------------ loading
def load_digits_model(path: str | Path):
    """(transformer, text encoder, codec, scheduler, meta dict) from a directory train_digits.py wrote."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(path)
    parts = ("instgenie_model.json", "transformer", "text_encoder", "scheduler")
    missing = [p for p in parts if not (path / p).exists()]
    if missing:
        raise ModelLoadError(f"{str(path)!r} is not a digits model directory: missing {missing}; "
                             "build one with `python -m instgenie.engine.models.train_digits --out DIR`")
    meta = json.loads((path / "instgenie_model.json").read_text())
    transformer = FluxTransformer2DModel.from_pretrained(path / "transformer", local_files_only=True).eval()
    embedder = LabelEmbedder.from_pretrained(path / "text_encoder", local_files_only=True).eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler", local_files_only=True)
    return transformer, DigitsTextEncoder(embedder), PixelCodec(), scheduler, meta
