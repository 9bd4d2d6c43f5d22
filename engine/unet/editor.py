"""Registration and mask-aware edits for the UNet family (Stable Diffusion inpainting) with O-caching."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..editor import Editor
from ..masks import TokenMask
from ..request import EditRequest, RequestState
from ..template_cache import BASE_SHARD, step_shard
from .ocache import OCapture, activated, instrument_unet
from .step import predicted_x0, template_latents_at, unet_step


def latent_mask(pixels: torch.Tensor, scale_factor: int, dilate: int = 0) -> TokenMask:
    """Pixel mask -> the latent grid by max-pooling (a cell is regenerated if any of its pixels is masked).

    Tokens of the finest UNet level are latent cells; coarser levels max-pool further (ocache.level_masks).
    `dilate` grows the regenerated cells by that many in every direction.
    """
    latent = F.max_pool2d(pixels.float()[None, None], scale_factor)
    if dilate > 0:
        latent = F.max_pool2d(latent, 2 * dilate + 1, stride=1, padding=dilate)
    tokens = latent.flatten().bool()
    return TokenMask(pixels=pixels, tokens=tokens, index=tokens.nonzero().flatten(), blend=latent)


class UNetEditor(Editor):
    """Editor for a 9-channel inpainting UNet: same contract (register, start, step, finish), O-cache mode.

    The UNet input is [latents, mask, masked-image latents] as StableDiffusionInpaintPipeline builds it; the
    mask channel is the regenerated latent cells (any-pixel rule) and the masked image is encoded to its
    distribution's mode. Unmasked latents are pinned to the template's trajectory every step, which is what
    makes the template's cached self-attention outputs valid for them.
    """

    cache_modes = ("o",)

    def _instrument(self) -> None:
        instrument_unet(self.model.transformer)

    # --------------------------------------------------------------------------------- family hooks
    def _encode_layout(self, latents: torch.Tensor) -> torch.Tensor:
        return latents  # a UNet takes latent images

    def _latent_image(self, latents: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
        return latents

    def _latent_shape(self, resolution: tuple[int, int]) -> tuple[int, ...]:
        return (1, self.model.codec.latent_channels, *self.latent_grid(resolution))

    def image_tokens(self, resolution: tuple[int, int]) -> int:
        h, w = self.latent_grid(resolution)
        return h * w  # the finest level's tokens are latent cells

    def _hidden(self) -> int:
        return int(self.model.transformer.config.block_out_channels[0])

    def _timesteps(self, steps: int, resolution: tuple[int, int]):
        sched = copy.deepcopy(self._scheduler)
        sched.set_timesteps(steps, device=self.model.device)
        return sched

    def _unet_condition(self, image: torch.Tensor, mask: TokenMask) -> torch.Tensor:
        """(1, 1 + C, h, w): the mask channel, then the masked image's latents (the pipeline's channel order)."""
        m = mask.pixels.to(image.device, image.dtype)[None, None]
        masked = self.model.codec.encode(image * (1 - m))
        return torch.cat([mask.blend.to(masked.device, masked.dtype), masked], dim=1)

    # --------------------------------------------------------------------------------- registration
    def _record(self, manifest, sched, image_latents, noise, img, text, guidance, progress) -> None:
        unet, branches = self.model.transformer, manifest.branches
        self.store.put_shard(manifest, BASE_SHARD, {"image_latents": image_latents, "noise": noise, "image": img})
        empty = latent_mask(torch.zeros(manifest.resolution, dtype=torch.bool), self.model.codec.scale_factor)
        cond = self._unet_condition(img, empty)
        latents = noise * sched.init_noise_sigma  # strength 1: step 0 starts from pure noise everywhere
        for i, t in enumerate(sched.timesteps):
            record: dict[str, torch.Tensor] = {}
            sample = torch.cat([sched.scale_model_input(latents, t), cond], dim=1).expand(branches, -1, -1, -1)
            with torch.no_grad(), activated(unet, OCapture(record=record)):
                unet(sample, t.expand(branches), encoder_hidden_states=text.prompt_embeds, return_dict=False)
            self.store.put_shard(manifest, step_shard(i), record)
            if i + 1 < len(sched.timesteps):  # every token pinned: the template noised to the next level
                latents = template_latents_at(sched, image_latents, noise, sched.timesteps[i + 1])
            if progress:
                progress(i + 1, manifest.steps)

    # ------------------------------------------------------------------------------------------ edits
    def start(self, request: EditRequest) -> RequestState:
        manifest, pixels = self._admit(request)
        device, dtype = self.model.device, self.model.dtype
        tmask = latent_mask(pixels, self.model.codec.scale_factor, request.dilate)
        tmask.blend = tmask.blend.to(device, dtype)
        tmask.index, tmask.tokens = tmask.index.to(device), tmask.tokens.to(device)
        text = self.model.text.encode(self._prompts(request.prompt))
        _, cfg_scale = self._guidance(request.guidance_scale if request.guidance_scale is not None
                                      else manifest.guidance_scale)
        base = self._base(manifest)
        sched = self._timesteps(manifest.steps, manifest.resolution)
        noise_req = self._noise(request.seed, manifest.resolution)
        # Masked cells start from the request's noise, unmasked from the template's (its cached trajectory).
        latents = ((1 - tmask.blend) * base["noise"] + tmask.blend * noise_req) * sched.init_noise_sigma
        return RequestState(
            request=request, manifest=manifest, mask=tmask, text=text, scheduler=sched,
            timesteps=sched.timesteps, sigmas=sched.timesteps, latents=latents, image_latents=base["image_latents"],
            noise=base["noise"], template_image=base["image"], guidance=None, cfg_scale=cfg_scale,
            cache=self._template_cache(manifest), cond=self._unet_condition(base["image"], tmask),
        )

    def _template_cache(self, manifest):
        """Step shards on the model's device: the UNet path reads whole shards (no per-block streaming yet)."""
        get, device = self.cache.getter(manifest), self.model.device
        if device.type == "cpu":
            return get
        return lambda step: {k: v.to(device, non_blocking=True) for k, v in get(step).items()}

    def preview_inputs(self, state: RequestState, start: torch.Tensor):
        """The last step's model output and the latents it started from (references, see Editor)."""
        return state.last_prediction

    def preview_latents(self, state: RequestState, inputs) -> torch.Tensor:
        """The scheduler's own x0 prediction from the last step's epsilon (step.predicted_x0) for masked cells;
        the template's latents, which the result keeps, for the others."""
        if inputs is None:
            raise ValueError("no step has run")
        i, sample, output = inputs
        x0 = predicted_x0(state.scheduler, state.timesteps[i], sample, output)
        return state.mask.blend * x0 + (1 - state.mask.blend) * state.image_latents

    def step(self, states: list[RequestState], use_cache: list[bool] | None = None) -> dict[str, str]:
        """One denoising step; O-caching serves every block from the cache, so `use_cache` is not used."""
        return unet_step(self.model.transformer, states)

