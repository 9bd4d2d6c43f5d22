"""An edit request as the engine receives it, and the per-request state it carries between steps."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import validation as v
from .ids import validate_request_id, validate_template_id
from .masks import TokenMask
from .models.base import TextEmbeddings
from .template_cache import TemplateManifest
from .validation import EDIT_PATHS

_ids = itertools.count()


@dataclass
class EditRequest:
    """One edit. Scalar fields are checked on construction (typed errors, nothing coerced) and again when
    the engine starts the request; the mask is checked against the template's size when it starts."""

    template_id: str
    mask: object  # PIL image / numpy array / torch tensor / encoded PNG bytes; white = edit (see images.py)
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

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise the typed error of the first bad scalar field (fields may have been reassigned since)."""
        validate_request_id(self.request_id)
        validate_template_id(self.template_id)
        v.validate_prompt(self.prompt)
        v.validate_seed(self.seed)
        v.validate_steps(self.steps)
        v.validate_guidance(self.guidance_scale)
        v.validate_dilate(self.dilate)
        v.validate_choice(self.path, EDIT_PATHS, field="path")
        for name in ("paste_back", "allow_empty_mask", "fallback_to_full"):
            v.validate_flag(getattr(self, name), field=name)
        v.validate_deadline(self.deadline)


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
    latents: torch.Tensor  # (1, N, 4C) packed tokens (Flux), or a UNet's latent image (1, C, h, w)
    image_latents: torch.Tensor  # the template's latents, same layout
    noise: torch.Tensor  # (1, N, 4C) the template's noise: unmasked tokens follow its trajectory exactly
    template_image: torch.Tensor  # (1, C, H, W) in [-1, 1], for paste-back
    guidance: torch.Tensor | None  # (1,) distilled guidance value
    cfg_scale: float | None  # true CFG scale, None when the model has no CFG
    cache: Callable[[int], dict[str, torch.Tensor]]  # step -> that step's cache tensors
    #: (1, N, C_cond) constant extra input channels of every token (FLUX.1-Fill: masked-image latents ++ mask),
    #: concatenated after the noisy latents at every step; None for models without them
    cond: torch.Tensor | None = None
    step_index: int = 0
    #: set when the cache failed and the request continues with full compute; says why
    degraded: str | None = None
    created: float = field(default_factory=time.monotonic)
    step_times: list[float] = field(default_factory=list)
    #: per guidance branch, a digest of what fixes its AdaLN conditioning at every step (pooled prompt, schedule,
    #: guidance); with the step index it keys the shared modulation rows (transformer/modulation.py)
    cond_digest: list[bytes] | None = None
    #: the last step's (step index, latents it started from, guided model output), kept by families whose
    #: previews predict x0 from the model output (a UNet's epsilon); references to tensors a step replaces
    last_prediction: tuple | None = None

    @property
    def total_steps(self) -> int:
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.step_index >= self.total_steps

    @property
    def branches(self) -> int:
        return self.text.prompt_embeds.shape[0]

    def model_input(self) -> torch.Tensor:
        """The denoiser's input: latents, then any conditioning channels (FLUX.1-Fill, a 9-channel UNet)."""
        if self.cond is None:
            return self.latents
        # packed tokens (1, N, C) take channels last; a UNet's latent image (1, C, h, w) takes them on dim 1
        return torch.cat([self.latents, self.cond], dim=1 if self.latents.ndim == 4 else -1)


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
