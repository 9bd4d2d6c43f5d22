"""One denoising step of UNet requests: the 9-channel input, one UNet call with O-cache taps, DDIM-style step."""
from __future__ import annotations

import torch

from ..request import RequestState
from ..step import denoise_step
from .ocache import OCapture, activated, level_masks


def unet_levels(unet) -> int:
    """Resolutions the UNet works at (one per block_out_channels entry)."""
    return len(unet.config.block_out_channels)


def template_latents_at(s_sched, image_latents: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
    """The template's latents noised to `timestep`, the scheduler's own `add_noise` (as the inpaint pipeline)."""
    return s_sched.add_noise(image_latents, noise, timestep.reshape(1))


@torch.no_grad()
def predict_unet(unet, states: list[RequestState], shards: dict, use_cache, path: str, pipeline=None) -> torch.Tensor:
    """UNet output for every sequence (request x guidance branch), (S, C, h, w).

    path "sparse": attn1 queries for masked tokens only, unmasked outputs from the cache; "dense": the oracle
    (every row computed, unmasked ones substituted); "full": the stock UNet.
    """
    seqs = [(s, g) for s in states for g in range(s.branches)]
    sample = torch.cat([torch.cat([s.scheduler.scale_model_input(s.latents, s.timesteps[s.step_index]), s.cond], 1)
                        for s, _ in seqs])
    timestep = torch.stack([s.timesteps[s.step_index] for s, _ in seqs])
    prompt_embeds = torch.cat([s.text.prompt_embeds[g:g + 1] for s, g in seqs])
    call = dict(encoder_hidden_states=prompt_embeds, return_dict=False)
    if path == "full":
        return unet(sample, timestep, **call)[0]
    h, w = sample.shape[-2:]
    keep = torch.stack([s.mask.tokens.view(h, w) for s, _ in seqs])
    capture = OCapture(caches=[(shards[id(s)], g) for s, g in seqs], keep=level_masks(keep, unet_levels(unet)),
                       sparse=path == "sparse")
    with activated(unet, capture):
        return unet(sample, timestep, **call)[0]


def advance_unet(s: RequestState, pred: torch.Tensor) -> None:
    """Guidance, the request's own scheduler step, then pin unmasked latents to the template trajectory."""
    noise_pred = pred[0:1] + s.cfg_scale * (pred[1:2] - pred[0:1]) if s.cfg_scale is not None else pred[0:1]
    i = s.step_index
    s.last_prediction = (i, s.latents, noise_pred)  # for previews: references, the step replaces s.latents
    latents = s.scheduler.step(noise_pred, s.timesteps[i], s.latents, return_dict=False)[0]
    last = i == s.total_steps - 1
    pinned = s.image_latents if last else template_latents_at(s.scheduler, s.image_latents, s.noise, s.timesteps[i + 1])
    s.latents = (1 - s.mask.blend) * pinned + s.mask.blend * latents
    s.step_index += 1


def predicted_x0(scheduler, timestep, sample: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
    """The clean latents a variance-preserving scheduler (DDIM, DDPM, PNDM, DPM-Solver: x_t = sqrt(a) x0 +
    sqrt(1 - a) eps with a = alphas_cumprod[t]) predicts from the model's output at `timestep`, as DDIM's
    `pred_original_sample`, for the checkpoint's `prediction_type` (epsilon, v_prediction or sample).
    ValueError for a scheduler whose latents are not in that form (Euler-like: scaled by sigma)."""
    if not hasattr(scheduler, "alphas_cumprod") or float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
        raise ValueError(f"{type(scheduler).__name__} is not a variance-preserving scheduler")
    a = scheduler.alphas_cumprod[int(timestep)].to(sample.device, torch.float32)
    x, out = sample.float(), model_output.float()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0 = (x - (1 - a).sqrt() * out) / a.sqrt()
    elif kind == "v_prediction":
        x0 = a.sqrt() * x - (1 - a).sqrt() * out
    elif kind == "sample":
        x0 = out
    else:
        raise ValueError(f"unknown prediction_type {kind!r}")
    return x0.to(sample.dtype)


def unet_step(unet, states: list[RequestState], use_cache=None) -> dict[str, str]:
    """Advance UNet states by one step (the shared loop of step.denoise_step: cache reads, fallbacks, errors)."""
    return denoise_step(unet, states, None, None, predict=predict_unet, advance=advance_unet)
