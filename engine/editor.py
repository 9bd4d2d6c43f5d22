"""The engine's front door: register a template (full run, cache recorded) and edit it mask-aware."""
from __future__ import annotations

import copy
import hashlib
import time

import numpy as np
import torch

from .errors import CacheMismatchError, InstGenIEError, InvalidImageError, InvalidInputError, InvalidStepsError, TemplateNotFoundError
from .cache_provider import CacheProvider, MemoProvider
from .latents import image_ids, image_to_tensor, pack, tensor_to_image, unpack
from .pipeline import PipelineConfig
from .masks import load_mask, tokens_from_mask
from .models.loader import EditModel
from .request import EDIT_PATHS, EditRequest, EditResult, RequestState
from .step import denoise_step, renoise
from .template_cache import TemplateManifest, TemplateStore, step_shard
from .transformer.cache_view import CACHE_MODES
from .transformer.reference import dense_forward

MAX_STEPS = 200


class Editor:
    """Registers templates and serves edits on one model. Not thread-safe: one engine loop drives it."""

    def __init__(self, model: EditModel, store: TemplateStore, resident_templates: int = 4,
                 cache: CacheProvider | None = None, pipeline: PipelineConfig | None = None):
        self.model = model
        self.store = store
        # None: shards are used where they are; a config streams them to the device per block (and plans).
        self.pipeline = pipeline
        # Where step shards come from: by default a memo of recent templates; workers plug the host tier in.
        self.cache = cache or MemoProvider(store, resident_templates)

    # ----------------------------------------------------------------------------------------- helpers
    @property
    def latent_hw(self) -> tuple[int, int]:
        s = self.model.codec.scale_factor
        return self.model.info.resolution[0] // s, self.model.info.resolution[1] // s

    def _timesteps(self, steps: int):
        """A fresh scheduler copy with the pipeline's sigma schedule (dynamic shift from the token count)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        sched = copy.deepcopy(self.model.scheduler)
        sigmas = np.linspace(1.0, 1 / steps, steps)
        kwargs = {}
        if sched.config.get("use_dynamic_shifting", False):
            h, w = self.latent_hw
            kwargs["mu"] = calculate_shift((h // 2) * (w // 2), sched.config.get("base_image_seq_len", 256),
                                           sched.config.get("max_image_seq_len", 4096),
                                           sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.15))
        sched.set_timesteps(sigmas=sigmas, device=self.model.device, **kwargs)
        return sched

    def _prompts(self, prompt: str) -> list[str]:
        return ["", prompt] if self.model.info.guidance == "cfg" else [prompt]

    def _guidance(self, scale: float | None):
        info = self.model.info
        scale = info.default_guidance_scale if scale is None else float(scale)
        if not np.isfinite(scale) or scale < 0 or scale > 50:
            raise InvalidInputError(f"guidance_scale must be within [0, 50], got {scale}")
        if info.guidance == "distilled":
            return torch.full([1], scale, dtype=torch.float32, device=self.model.device), None
        return None, (scale if info.guidance == "cfg" else None)

    def _image(self, image) -> torch.Tensor:
        try:
            t = image_to_tensor(image, self.model.codec.image_channels)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the caller's input
            raise InvalidImageError(f"cannot read the image: {exc}") from exc
        if tuple(t.shape[-2:]) != tuple(self.model.info.resolution):
            h, w = self.model.info.resolution
            raise InvalidImageError(
                f"image is {t.shape[-1]}x{t.shape[-2]} but model {self.model.info.model_id!r} serves {w}x{h}; "
                "resize it first"
            )
        return t.to(self.model.device, self.model.dtype)

    def _noise(self, seed: int) -> torch.Tensor:
        h, w = self.latent_hw
        gen = torch.Generator("cpu").manual_seed(int(seed))
        noise = torch.randn((1, self.model.codec.latent_channels, h, w), generator=gen, dtype=torch.float32)
        return pack(noise).to(self.model.device, self.model.dtype)

    # ------------------------------------------------------------------------------------ registration
    def register_template(self, image, prompt: str = "", *, steps: int | None = None, seed: int = 0,
                          mode: str = "kv", guidance_scale: float | None = None,
                          template_id: str | None = None, progress=None) -> TemplateManifest:
        """Full inference once on the template with an empty mask, recording every block's cache per step."""
        if mode not in CACHE_MODES:
            raise InvalidInputError(f"cache mode must be one of {CACHE_MODES}, got {mode!r}")
        steps = self.model.info.default_steps if steps is None else int(steps)
        if not 1 <= steps <= MAX_STEPS:
            raise InvalidStepsError(f"steps must be within [1, {MAX_STEPS}], got {steps}")
        img = self._image(image)
        text = self.model.text.encode(self._prompts(prompt))
        guidance, cfg_scale = self._guidance(guidance_scale)
        info, tr = self.model.info, self.model.transformer
        if template_id is None:
            h = hashlib.sha256(img.cpu().numpy().tobytes())
            h.update(f"{prompt}|{steps}|{seed}|{mode}|{info.config_hash}|{guidance_scale}".encode())
            template_id = "tpl-" + h.hexdigest()[:16]

        sched = self._timesteps(steps)
        image_latents = pack(self.model.codec.encode(img))
        noise = self._noise(seed)
        n_img = image_latents.shape[1]
        branches = text.prompt_embeds.shape[0]
        manifest = TemplateManifest(
            template_id=template_id, model_id=info.model_id, config_hash=info.config_hash,
            resolution=tuple(info.resolution), steps=steps, seed=int(seed), prompt=prompt, cache_mode=mode,
            dtype=str(self.model.dtype).removeprefix("torch."), guidance=info.guidance,
            guidance_scale=float(guidance_scale if guidance_scale is not None else info.default_guidance_scale),
            branches=branches, num_blocks=self.model.num_blocks, image_tokens=n_img,
            text_tokens=text.prompt_embeds.shape[1], hidden=tr.inner_dim, scheduler=dict(sched.config),
            created_at=time.time(),
        )
        self.store.put_shard(manifest, "base.safetensors",
                             {"image_latents": image_latents, "noise": noise, "image": img})
        h, w = self.latent_hw
        img_ids = image_ids(h, w, self.model.device, self.model.dtype)
        latents = renoise(image_latents, sched.sigmas[0], noise)
        for i, t in enumerate(sched.timesteps):
            record: dict[str, torch.Tensor] = {}
            timestep = (t.to(self.model.dtype) / 1000).expand(branches)
            dense_forward(tr, latents.expand(branches, -1, -1), text.prompt_embeds, text.pooled, timestep,
                          text.text_ids, img_ids, None if guidance is None else guidance.expand(branches),
                          mode=mode, record=record)
            self.store.put_shard(manifest, step_shard(i), record)
            # Every token is pinned: the next input is the template re-noised to the next level.
            latents = renoise(image_latents, sched.sigmas[i + 1], noise)
            if progress:
                progress(i + 1, steps)
        self.store.commit(manifest)
        return manifest

    # ------------------------------------------------------------------------------------------ edits
    def _template_cache(self, manifest: TemplateManifest):
        get = self.cache.getter(manifest)
        device = self.model.device
        if device.type == "cpu":
            return get
        return lambda step: {k: v.to(device, non_blocking=True) for k, v in get(step).items()}

    def prefetch(self, template_id: str) -> None:
        """Start warming a template's cache, e.g. as soon as a request for it is assigned to this worker."""
        self.cache.prefetch(self.store.manifest(template_id))

    def start(self, request: EditRequest) -> RequestState:
        """Validate and pre-process a request into its own state (off the denoising loop)."""
        if request.path not in EDIT_PATHS:
            raise InvalidInputError(f"path must be one of {EDIT_PATHS}, got {request.path!r}")
        if not isinstance(request.dilate, int) or not 0 <= request.dilate <= 8:
            raise InvalidInputError(f"dilate must be an integer within [0, 8] tokens, got {request.dilate!r}")
        manifest = self.store.manifest(request.template_id)
        info = self.model.info
        if manifest.model_id != info.model_id or manifest.config_hash != info.config_hash:
            raise CacheMismatchError(
                f"template {manifest.template_id!r} was registered with model {manifest.model_id!r} "
                f"({manifest.config_hash}); this worker serves {info.model_id!r} ({info.config_hash})"
            )
        if request.steps is not None and int(request.steps) != manifest.steps:
            raise InvalidStepsError(
                f"template {manifest.template_id!r} was registered with {manifest.steps} steps; edits must use "
                f"{manifest.steps} (got {request.steps})"
            )
        pixels = load_mask(request.mask, manifest.resolution, allow_empty=request.allow_empty_mask)
        tmask = tokens_from_mask(pixels, self.model.codec.scale_factor, self.model.codec.latent_channels,
                                 request.dilate)
        tmask.blend = tmask.blend.to(self.model.device, self.model.dtype)
        tmask.index = tmask.index.to(self.model.device)
        tmask.tokens = tmask.tokens.to(self.model.device)
        text = self.model.text.encode(self._prompts(request.prompt))
        guidance, cfg_scale = self._guidance(request.guidance_scale if request.guidance_scale is not None
                                             else manifest.guidance_scale)
        base = {k: v.to(self.model.device) for k, v in self.store.shard(manifest, "base.safetensors").items()}
        sched = self._timesteps(manifest.steps)
        noise_req = self._noise(request.seed)
        # Masked tokens start from the request's noise; unmasked ones from the template's, so that they
        # follow exactly the trajectory the cache recorded.
        start_template = renoise(base["image_latents"], sched.sigmas[0], base["noise"])
        start_request = renoise(base["image_latents"], sched.sigmas[0], noise_req)
        latents = (1 - tmask.blend) * start_template + tmask.blend * start_request
        return RequestState(
            request=request, manifest=manifest, mask=tmask, text=text, scheduler=sched,
            timesteps=sched.timesteps, sigmas=sched.sigmas, latents=latents, image_latents=base["image_latents"],
            noise=base["noise"], template_image=base["image"], guidance=guidance, cfg_scale=cfg_scale,
            cache=self._template_cache(manifest),
        )

    def step(self, states: list[RequestState], use_cache: list[bool] | None = None) -> dict[str, str]:
        """One denoising step for all states; returns {request_id: error} of requests that failed alone."""
        return denoise_step(self.model.transformer, states, use_cache, self.pipeline)

    @torch.no_grad()
    def finish(self, state: RequestState) -> EditResult:
        """Decode, and paste the template's pixels back outside the mask (off the denoising loop)."""
        h, w = self.latent_hw
        decoded = self.model.codec.decode(unpack(state.latents, h, w))
        if state.request.paste_back:
            m = state.mask.pixels.to(decoded.device)[None, None]
            decoded = torch.where(m, decoded, state.template_image.to(decoded.dtype))
        return EditResult(
            request_id=state.request.request_id, image=tensor_to_image(decoded), latents=state.latents,
            mask_ratio=state.mask.ratio, steps=state.total_steps, seconds=time.monotonic() - state.created,
            step_seconds=list(state.step_times), degraded=state.degraded,
        )

    def edit(self, template_id: str, mask, prompt: str, **kwargs) -> EditResult:
        """One edit, start to finish, alone in its batch."""
        state = self.start(EditRequest(template_id=template_id, mask=mask, prompt=prompt, **kwargs))
        while not state.done:
            failed = self.step([state])
            if failed:
                raise InstGenIEError(failed[state.request.request_id])
        return self.finish(state)

    def delete_template(self, template_id: str) -> None:
        self.cache.forget(template_id)
        self.store.delete(template_id)

    def has_template(self, template_id: str) -> bool:
        return self.store.exists(template_id)


__all__ = ["Editor", "EditRequest", "TemplateNotFoundError"]
