"""The component contracts every model family implements: text encoder, latent codec, bundle."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class TextEmbeddings:
    """Encoded prompts for a batch of B sequences.

    prompt_embeds: (B, T, joint_attention_dim), the transformer's `encoder_hidden_states`.
    pooled: (B, pooled_projection_dim), the transformer's `pooled_projections`.
    text_ids: (T, 3) RoPE position ids of the text tokens (zeros for Flux).
    """

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor

    def select(self, rows: list[int] | torch.Tensor) -> "TextEmbeddings":
        return TextEmbeddings(self.prompt_embeds[rows], self.pooled[rows], self.text_ids)


class TextEncoder(Protocol):
    """Turns prompts into transformer conditioning. `""` is the unconditional (negative) prompt.

    `encode` must be safe to call from several threads at once (pre-processing pool, registration).
    """

    def encode(self, prompts: list[str]) -> TextEmbeddings:
        """Raises InvalidPromptError for a prompt the model cannot encode."""
        ...


class LatentCodec(Protocol):
    """Maps images in [-1, 1], (B, C_img, H, W), to model latents (B, C_lat, H/s, W/s) and back.

    `scale_factor` is s (8 for a Flux VAE, 1 for a pixel-space model). Encoding must be deterministic
    (the distribution's mode, not a sample): a template must encode the same way every time.
    """

    scale_factor: int
    latent_channels: int
    image_channels: int

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


@dataclass
class ModelInfo:
    """What the engine must know about a loaded model besides its modules."""

    model_id: str
    #: "flux" (inpaint blend over a text-to-image Flux transformer) or "flux-fill" (mask channels as input)
    family: str
    #: height/width in pixels the model serves (a multiple of 2 * codec.scale_factor)
    resolution: tuple[int, int]
    default_steps: int
    #: "none" (e.g. FLUX.1-schnell), "distilled" (FLUX.1-dev guidance embedding) or "cfg" (true CFG)
    guidance: str = "none"
    default_guidance_scale: float = 1.0
    #: fingerprint of every weight and config that changes a cache (transformer, VAE, text encoders) and the
    #: run dtype (models/fingerprint.py); a template cache is bound to it
    config_hash: str = ""
    extra: dict = field(default_factory=dict)
