"""The engine's front door: register a template (full run, cache recorded) and edit it mask-aware."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import threading
import time

import numpy as np
import torch

from . import validation as v
from .cache_provider import CacheProvider, MemoProvider
from .errors import (
    CacheIntegrityError, CacheMismatchError, InstGenIEError, InvalidImageError, InvalidInputError, InvalidStepsError,
    TemplateExistsError, TemplateNotFoundError,
)
from .ids import validate_template_id
from .images import DEFAULT_LIMITS, ImageLimits
from .latents import image_ids, image_to_tensor, pack, tensor_to_image, unpack
from .masks import load_mask, tokens_from_mask
from .models.fill import fill_condition
from .models.loader import EditModel
from .pipeline import PipelineConfig
from .request import EDIT_PATHS, EditRequest, EditResult, RequestState  # noqa: F401 - EDIT_PATHS re-exported
from .step import denoise_step, renoise
from .template_cache import BASE_SHARD, TemplateManifest, TemplateStore, step_shard
from .transformer.reference import dense_forward, instrument
from .validation import CACHE_MODES, MAX_STEPS  # noqa: F401 - MAX_STEPS re-exported

log = logging.getLogger(__name__)


class Editor:
    """Registers templates and serves edits on one model.

    Which methods may run concurrently (the worker runs pre-processing on a pool, post-processing on another,
    registrations on a thread of their own, all beside the engine loop):
      * `start` and `finish`: any number of threads at once, beside everything below. They share only the
        read-only model (the text encoder serialises its stateful tokenizers itself), the store and the cache
        provider (both thread-safe); each request's state is its own, with its own scheduler copy.
      * `step`: one thread at a time (the engine loop); it advances only the states it is given.
      * `register_template`: any thread, beside a running loop and beside other registrations (those of the
        same template id are serialised). Its dense forward records through per-thread taps (see
        transformer/reference.py), so the loop's forward on the same transformer is untouched.
      * `prefetch`, `has_template`, `delete_template`: any thread.
    """

    def __init__(self, model: EditModel, store: TemplateStore, resident_templates: int = 4,
                 cache: CacheProvider | None = None, pipeline: PipelineConfig | None = None,
                 image_limits: ImageLimits = DEFAULT_LIMITS):
        self.model = model
        self.store = store
        # None: shards are used where they are; a config streams them to the device per block (and plans).
        self.pipeline = pipeline
        # Where step shards come from: by default a memo of recent templates; workers plug the host tier in.
        self.cache = cache or MemoProvider(store, resident_templates)
        self.image_limits = image_limits
        # A private scheduler template, only ever deep-copied: the model's own instance is shared with the stock
        # pipeline, which steps it, and a copy taken while another thread mutates it would be inconsistent.
        self._scheduler = copy.deepcopy(model.scheduler)
        # The taps go in now, before the transformer is shared between threads.
        self._instrument()
        self._id_locks: dict[str, list] = {}  # template id -> [lock, users]
        self._id_locks_guard = threading.Lock()

    # ----------------------------------------------------------------------------------------- helpers
    @property
    def latent_hw(self) -> tuple[int, int]:
        """Latent grid of the model's default resolution (templates may have their own: `latent_grid`)."""
        return self.latent_grid(self.model.info.resolution)

    def latent_grid(self, resolution: tuple[int, int]) -> tuple[int, int]:
        """Latent (height, width) of an image of `resolution` pixels."""
        s = self.model.codec.scale_factor
        return resolution[0] // s, resolution[1] // s

    def on_grid(self, hw: tuple[int, int]) -> bool:
        """True if both sides of (height, width) `hw` are positive multiples of the model's token cell."""
        cell = self.model.cell
        return all(side >= cell and side % cell == 0 for side in hw)

    def check_resolution(self, hw: tuple[int, int], *, field: str = "image") -> None:
        """InvalidImageError unless the model can serve an uploaded image of (height, width) `hw`.

        Any size whose sides are multiples of the model's token cell (VAE factor x 2x2 packing: 16 px for
        Flux) within the image limits: RoPE positions cover any grid, and the schedule's shift follows the
        token count. A template keeps its own size; requests of different sizes never share a step.
        """
        h, w = hw
        if not self.on_grid(hw):
            raise InvalidImageError(f"{field} is {w}x{h}; model {self.model.info.model_id!r} takes sizes whose "
                                    f"sides are multiples of {self.model.cell} px; crop or resize it first",
                                    field=field)
        if h * w > self.image_limits.max_pixels:
            raise InvalidImageError(f"{field} is {w}x{h}, more than {self.image_limits.max_pixels} pixels",
                                    field=field)

    def _timesteps(self, steps: int, resolution: tuple[int, int]):
        """A fresh scheduler copy with the pipeline's sigma schedule (dynamic shift from the token count)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        sched = copy.deepcopy(self._scheduler)
        sigmas = np.linspace(1.0, 1 / steps, steps)
        kwargs = {}
        if sched.config.get("use_dynamic_shifting", False):
            h, w = self.latent_grid(resolution)
            kwargs["mu"] = calculate_shift((h // 2) * (w // 2), sched.config.get("base_image_seq_len", 256),
                                           sched.config.get("max_image_seq_len", 4096),
                                           sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.15))
        sched.set_timesteps(sigmas=sigmas, device=self.model.device, **kwargs)
        return sched

    def _prompts(self, prompt: str) -> list[str]:
        return ["", prompt] if self.model.info.guidance == "cfg" else [prompt]

    def _guidance(self, scale: float | None):
        info = self.model.info
        scale = info.default_guidance_scale if scale is None else v.validate_guidance(scale)
        if info.guidance == "distilled":
            return torch.full([1], scale, dtype=torch.float32, device=self.model.device), None
        return None, (scale if info.guidance == "cfg" else None)

    def _image(self, image) -> torch.Tensor:
        t = image_to_tensor(image, self.model.codec.image_channels, self.image_limits)
        self.check_resolution(tuple(t.shape[-2:]))
        # contiguous: an image converted from HWC arrays has channels-last strides, and the VAE's convolutions and
        # group norms round differently by layout; the stored template image (read back contiguous) must encode
        # exactly as it did at registration
        return t.to(self.model.device, self.model.dtype).contiguous()

    def _noise(self, seed: int, resolution: tuple[int, int] | None = None) -> torch.Tensor:
        h, w = self.latent_grid(resolution or self.model.info.resolution)
        gen = torch.Generator("cpu").manual_seed(v.validate_seed(seed))
        noise = torch.randn((1, self.model.codec.latent_channels, h, w), generator=gen, dtype=torch.float32)
        return self._encode_layout(noise).to(self.model.device, self.model.dtype)

    # Family hooks: how latents are laid out and what a template's geometry is. Flux packs 2x2 latent cells
    # into tokens; the UNet editor (unet/editor.py) keeps latents as images.
    def _encode_layout(self, latents: torch.Tensor) -> torch.Tensor:
        """(1, C, h, w) latents -> the layout the denoiser takes: packed tokens (1, N, 4C) for Flux."""
        return pack(latents)

    def _latent_image(self, latents: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
        """Inverse of `_encode_layout` for an image of `resolution` pixels."""
        return unpack(latents, *self.latent_grid(resolution))

    def _encode(self, image: torch.Tensor) -> torch.Tensor:
        return self._encode_layout(self.model.codec.encode(image))

    def _latent_shape(self, resolution: tuple[int, int]) -> tuple[int, ...]:
        return (1, self.image_tokens(resolution), 4 * self.model.codec.latent_channels)

    def image_tokens(self, resolution: tuple[int, int]) -> int:
        """Tokens of the template's (finest) grid: what a mask ratio and the cache size are counted in."""
        h, w = self.latent_grid(resolution)
        return (h // 2) * (w // 2)

    def _hidden(self) -> int:
        return self.model.transformer.inner_dim

    #: cache modes this family records (transformer/cache_view.py); the first is the default
    cache_modes: tuple[str, ...] = ("kv", "y")

    def _instrument(self) -> None:
        instrument(self.model.transformer)

    def _condition(self, image: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor | None:
        """Extra input channels of a mask-conditioned family (FLUX.1-Fill), None for the inpaint-blend family."""
        if self.model.info.family != "flux-fill":
            return None
        return fill_condition(self.model.codec, image, pixels)

    @contextlib.contextmanager
    def _registering(self, template_id: str):
        """Registrations of one template id run one at a time (they write the same keys)."""
        with self._id_locks_guard:
            entry = self._id_locks.setdefault(template_id, [threading.Lock(), 0])
            entry[1] += 1  # users of this lock; the entry goes when the last one leaves
        try:
            with entry[0]:
                yield
        finally:
            with self._id_locks_guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._id_locks[template_id]

    # ------------------------------------------------------------------------------------ registration
    def register_template(self, image, prompt: str = "", *, steps: int | None = None, seed: int = 0,
                          mode: str | None = None, guidance_scale: float | None = None,
                          template_id: str | None = None, progress=None) -> TemplateManifest:
        """Full inference once on the template with an empty mask, recording every block's cache per step.

        Every argument is validated first (typed errors, nothing coerced). `progress(done, total)` is called
        after each step; if it raises, registration stops, nothing is committed, and the exception propagates
        (a cancel hook). Re-registering an existing id with the same inputs rewrites its cache (a repair);
        with different inputs it raises TemplateExistsError: a committed cache never changes under readers.
        """
        v.validate_prompt(prompt)
        steps = self.model.info.default_steps if steps is None else v.validate_steps(steps, allow_none=False)
        seed = v.validate_seed(seed)
        mode = self.cache_modes[0] if mode is None else mode  # the family's default: kv for Flux, o for a UNet
        if not isinstance(mode, str) or mode not in self.cache_modes:
            raise InvalidInputError(f"cache mode must be one of {self.cache_modes} for model "
                                    f"{self.model.info.model_id!r}, got {mode!r}", field="cache_mode")
        v.validate_guidance(guidance_scale)
        if template_id is not None:
            validate_template_id(template_id)
        if progress is not None and not callable(progress):
            raise InvalidInputError(f"progress must be callable, got {type(progress).__name__}", field="progress")
        img = self._image(image)
        text = self.model.text.encode(self._prompts(prompt))
        guidance, cfg_scale = self._guidance(guidance_scale)
        info = self.model.info
        h = hashlib.sha256(img.cpu().numpy().tobytes())
        image_sha256 = h.hexdigest()
        if template_id is None:
            h.update(f"{prompt}|{steps}|{seed}|{mode}|{info.config_hash}|{guidance_scale}".encode())
            template_id = "tpl-" + h.hexdigest()[:16]

        resolution = tuple(img.shape[-2:])
        sched = self._timesteps(steps, resolution)
        image_latents = self._encode(img)
        noise = self._noise(seed, resolution)
        n_img = self.image_tokens(resolution)
        branches = text.prompt_embeds.shape[0]
        manifest = TemplateManifest(
            template_id=template_id, model_id=info.model_id, config_hash=info.config_hash,
            resolution=resolution, steps=steps, seed=seed, prompt=prompt, cache_mode=mode,
            dtype=str(self.model.dtype).removeprefix("torch."), guidance=info.guidance,
            guidance_scale=float(guidance_scale if guidance_scale is not None else info.default_guidance_scale),
            branches=branches, num_blocks=self.model.num_blocks, image_tokens=n_img,
            text_tokens=text.prompt_embeds.shape[1], hidden=self._hidden(), scheduler=dict(sched.config),
            created_at=time.time(), image_sha256=image_sha256,
        )
        with self._registering(template_id):
            existed = self._check_replace(manifest)
            try:
                self._record(manifest, sched, image_latents, noise, img, text, guidance, progress)
                self.store.commit(manifest)
            except BaseException:
                if not existed:  # nobody could see it yet; leave no half-written cache behind
                    self._discard(template_id)
                raise
        self.cache.forget(template_id)
        return manifest

    def _check_replace(self, manifest: TemplateManifest) -> bool:
        """True if the id is taken by the same registration (a rewrite); TemplateExistsError if by another."""
        try:
            existing = self.store.manifest(manifest.template_id)
        except TemplateNotFoundError:
            return False
        except CacheIntegrityError:
            return True  # a broken manifest: this registration repairs it
        if existing.registration() != manifest.registration():
            raise TemplateExistsError(
                f"template {manifest.template_id!r} is already registered with other inputs (image, prompt, steps, "
                "seed, mode or guidance); delete it first or register under another id", field="template_id")
        return True

    def _discard(self, template_id: str) -> None:
        try:
            self.store.discard(template_id)
        except Exception as exc:  # noqa: BLE001 - the original error matters more; shards without manifest are inert
            log.warning("could not remove the uncommitted shards of %s: %s", template_id, exc)

    def _record(self, manifest, sched, image_latents, noise, img, text, guidance, progress) -> None:
        tr, steps, branches = self.model.transformer, manifest.steps, manifest.branches
        self.store.put_shard(manifest, BASE_SHARD, {"image_latents": image_latents, "noise": noise, "image": img})
        h, w = self.latent_grid(manifest.resolution)
        img_ids = image_ids(h, w, self.model.device, self.model.dtype)
        # Fill: nothing is masked in the template run, so the whole image conditions every step
        cond = self._condition(img, torch.zeros(manifest.resolution, dtype=torch.bool))
        latents = renoise(image_latents, sched.sigmas[0], noise)
        for i, t in enumerate(sched.timesteps):
            record: dict[str, torch.Tensor] = {}
            timestep = (t.to(self.model.dtype) / 1000).expand(branches)
            inputs = latents if cond is None else torch.cat([latents, cond], dim=-1)
            dense_forward(tr, inputs.expand(branches, -1, -1), text.prompt_embeds, text.pooled, timestep,
                          text.text_ids, img_ids, None if guidance is None else guidance.expand(branches),
                          mode=manifest.cache_mode, record=record)
            self.store.put_shard(manifest, step_shard(i), record)
            # Every token is pinned: the next input is the template re-noised to the next level.
            latents = renoise(image_latents, sched.sigmas[i + 1], noise)
            if progress:
                progress(i + 1, steps)

    # ------------------------------------------------------------------------------------------ edits
    def _template_cache(self, manifest: TemplateManifest):
        get = self.cache.getter(manifest)
        device = self.model.device
        if device.type == "cpu":
            return get

        def fetch(step: int) -> dict[str, torch.Tensor]:
            shard = get(step)
            if self.pipeline is not None:  # stays in host memory: streamed to the device block by block
                return shard
            return {k: v.to(device, non_blocking=True) for k, v in shard.items()}

        return fetch

    def prefetch(self, template_id: str) -> None:
        """Start warming a template's cache, e.g. as soon as a request for it is assigned to this worker."""
        manifest = self.store.manifest(template_id)
        self._check_manifest(manifest)
        self.cache.prefetch(manifest)

    def _admit(self, request: EditRequest) -> tuple[TemplateManifest, torch.Tensor]:
        """The request's verified manifest and its (H, W) bool pixel mask, every input checked."""
        if not isinstance(request, EditRequest):
            raise InvalidInputError(f"expected an EditRequest, got {type(request).__name__}")
        request.validate()  # again: fields may have been reassigned since construction
        manifest = self.store.manifest(request.template_id)
        self._check_manifest(manifest)
        if request.steps is not None and request.steps != manifest.steps:
            raise InvalidStepsError(
                f"template {manifest.template_id!r} was registered with {manifest.steps} steps; edits must use "
                f"{manifest.steps} (got {request.steps})", field="steps"
            )
        pixels = load_mask(request.mask, manifest.resolution, allow_empty=request.allow_empty_mask,
                           limits=self.image_limits)
        return manifest, pixels

    def start(self, request: EditRequest) -> RequestState:
        """Validate and pre-process a request into its own state (off the denoising loop; thread-safe)."""
        manifest, pixels = self._admit(request)
        tmask = tokens_from_mask(pixels, self.model.codec.scale_factor, self.model.codec.latent_channels,
                                 request.dilate)
        tmask.blend = tmask.blend.to(self.model.device, self.model.dtype)
        tmask.index = tmask.index.to(self.model.device)
        tmask.tokens = tmask.tokens.to(self.model.device)
        text = self.model.text.encode(self._prompts(request.prompt))
        guidance, cfg_scale = self._guidance(request.guidance_scale if request.guidance_scale is not None
                                             else manifest.guidance_scale)
        base = self._base(manifest)
        sched = self._timesteps(manifest.steps, manifest.resolution)
        noise_req = self._noise(request.seed, manifest.resolution)
        # Masked tokens start from the request's noise; unmasked ones from the template's, so that they
        # follow exactly the trajectory the cache recorded.
        start_template = renoise(base["image_latents"], sched.sigmas[0], base["noise"])
        start_request = renoise(base["image_latents"], sched.sigmas[0], noise_req)
        latents = (1 - tmask.blend) * start_template + tmask.blend * start_request
        return RequestState(
            request=request, manifest=manifest, mask=tmask, text=text, scheduler=sched,
            timesteps=sched.timesteps, sigmas=sched.sigmas, latents=latents, image_latents=base["image_latents"],
            noise=base["noise"], template_image=base["image"], guidance=guidance, cfg_scale=cfg_scale,
            cache=self._template_cache(manifest), cond=self._condition(base["image"], tmask.pixels),
        )

    def _check_manifest(self, manifest: TemplateManifest) -> None:
        """CacheMismatchError unless the (verified) manifest was recorded by exactly this model and geometry."""
        info, model = self.model.info, self.model
        if manifest.model_id != info.model_id or manifest.config_hash != info.config_hash:
            raise CacheMismatchError(
                f"template {manifest.template_id!r} was registered with model {manifest.model_id!r} "
                f"({manifest.config_hash}); this worker serves {info.model_id!r} ({info.config_hash})"
            )
        if not self.on_grid(tuple(manifest.resolution)):
            raise CacheMismatchError(f"template {manifest.template_id!r} is {manifest.resolution}, a size this model "
                                     f"cannot serve (sides must be multiples of {model.cell} px)")
        expected = {
            "num_blocks": model.num_blocks,
            "hidden": self._hidden(), "dtype": str(model.dtype).removeprefix("torch."),
            "guidance": info.guidance, "image_tokens": self.image_tokens(manifest.resolution),
            "branches": 2 if info.guidance == "cfg" else 1,
        }
        for name, want in expected.items():
            got = getattr(manifest, name)
            if got != want:
                raise CacheMismatchError(f"template {manifest.template_id!r} was recorded with {name} = {got!r}; "
                                         f"this model has {want!r}; re-register it")

    def _base(self, manifest: TemplateManifest) -> dict[str, torch.Tensor]:
        """The template's latents, noise and pixels, with their shapes checked against the manifest."""
        base = {k: t.to(self.model.device) for k, t in self.store.shard(manifest, BASE_SHARD).items()}
        c = self.model.codec
        latent = self._latent_shape(manifest.resolution)
        shapes = {"image_latents": latent, "noise": latent, "image": (1, c.image_channels, *manifest.resolution)}
        for name, shape in shapes.items():
            if name not in base or tuple(base[name].shape) != shape:
                got = tuple(base[name].shape) if name in base else None
                raise CacheIntegrityError(f"base shard of template {manifest.template_id!r} has {name} of shape "
                                          f"{got}, expected {shape}; re-register the template")
        return base

    def step(self, states: list[RequestState], use_cache: list[bool] | None = None) -> dict[str, str]:
        """One denoising step for all states; returns {request_id: error} of requests that failed alone."""
        return denoise_step(self.model.transformer, states, use_cache, self.pipeline)

    @torch.no_grad()
    def finish(self, state: RequestState) -> EditResult:
        """Decode, and paste the template's pixels back outside the mask (off the denoising loop)."""
        decoded = self.model.codec.decode(self._latent_image(state.latents, state.manifest.resolution))
        if state.request.paste_back:
            m = state.mask.pixels.to(decoded.device)[None, None]
            decoded = torch.where(m, decoded, state.template_image.to(decoded.dtype))
        return EditResult(
            request_id=state.request.request_id, image=tensor_to_image(decoded), latents=state.latents,
            mask_ratio=state.mask.ratio, steps=state.total_steps, seconds=time.monotonic() - state.created,
            step_seconds=list(state.step_times), degraded=state.degraded,
        )

    # Previews (the worker's StreamEdit): what the edit would look like if denoising stopped now.
    def preview_inputs(self, state: RequestState, start: torch.Tensor):
        """References to what `preview_latents` needs, taken on the engine's thread between steps (no copy, no
        compute: the next step replaces these tensors rather than writing into them). `start`: the request's
        latents before its first step."""
        return state.latents, start, float(state.sigmas[state.step_index])

    def preview_latents(self, state: RequestState, inputs) -> torch.Tensor:
        """The clean latents the edit is heading for, as a latent image to decode (off the denoising loop).

        Rectified flow moves x_t = (1 - sigma) x0 + sigma x1 from the starting noise x1 towards the image x0, so
        x0 ~ (x_t - sigma x1) / (1 - sigma): exact for unmasked tokens, converging on the result for masked ones.
        """
        latents, start, sigma = inputs
        x0 = (latents - sigma * start) / max(1.0 - sigma, 1e-3)
        return self._latent_image(x0, state.manifest.resolution)

    def edit(self, template_id: str, mask, prompt: str, **kwargs) -> EditResult:
        """One edit, start to finish, alone in its batch."""
        state = self.start(EditRequest(template_id=template_id, mask=mask, prompt=prompt, **kwargs))
        while not state.done:
            failed = self.step([state])
            if failed:
                raise InstGenIEError(failed[state.request.request_id])
        return self.finish(state)

    def delete_template(self, template_id: str) -> None:
        self.store.delete(template_id)
        self.cache.forget(template_id)

    def has_template(self, template_id: str) -> bool:
        return self.store.exists(template_id)


__all__ = ["Editor", "EditRequest", "TemplateNotFoundError"]
