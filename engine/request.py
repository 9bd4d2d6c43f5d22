"""An edit request as the engine receives it, and the per-request state it carries between steps."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .masks import TokenMask
from .models.base import TextEmbeddings
from .template_cache import TemplateManifest

#: how an edit computes each step: the mask-aware path, its dense oracle, or a full recompute without cache
EDIT_PATHS = ("sparse", "dense", "full")

_ids = itertools.count()


@dataclass
class EditRequest:
    template_id: str
    mask: object  # PIL image / array / tensor, white = edit
    prompt: str
    seed: int = 0
    steps: int | None = None  # must equal the template's when given
    guidance_scale: float | None = None
    dilate: int = 0
    path: str = "sparse"
    paste_back: bool = True
    deadline: float | None = None  # time.monotonic() value after which the request is abandoned
    request_id: str = field(default_factory=lambda: f"edit-{next(_ids)}")
    allow_empty_mask: bool = False  # internal: an empty mask returns the template (used by tests)
    #: if a cache shard is corrupt or unreachable mid-edit, finish by computing every token (never a wrong image)
    fallback_to_full: bool = True


@dataclass
class RequestState:
    """Everything one request needs between denoising steps. Nothing in it is shared with other requests."""

    request: EditRequest
    manifest: TemplateManifest
    mask: TokenMask
    text: TextEmbeddings  # one row per guidance branch (uncond first when true CFG)
    scheduler: object  # this request's own copy: diffusers schedulers are stateful
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    latents: torch.Tensor  # (1, N, 4C)
    image_latents: torch.Tensor  # (1, N, 4C) template latents
    noise: torch.Tensor  # (1, N, 4C) the template's noise: unmasked tokens follow its trajectory exactly
    template_image: torch.Tensor  # (1, C, H, W) in [-1, 1], for paste-back
    guidance: torch.Tensor | None  # (1,) distilled guidance value
    cfg_scale: float | None  # true CFG scale, None when the model has no CFG
    cache: Callable[[int], dict[str, torch.Tensor]]  # step -> that step's cache tensors
    step_index: int = 0
    #: set when the cache failed and the request continues with full compute; says why
    degraded: str | None = None
    created: float = field(default_factory=time.monotonic)
    step_times: list[float] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.step_index >= self.total_steps

    @property
    def branches(self) -> int:
        return self.text.prompt_embeds.shape[0]


@dataclass
class EditResult:
    request_id: str
    image: object  # PIL image
    latents: torch.Tensor  # final packed latents (1, N, 4C)
    mask_ratio: float
    steps: int
    seconds: float
    step_seconds: list[float]
    degraded: str | None = None  # why the edit fell back to full compute, if it did
