"""One denoising step for a batch of request states: pack, run the transformer once, step each scheduler."""
from __future__ import annotations

import hashlib
import logging
import time

import torch

from .errors import CacheIntegrityError, CacheUnavailableError
from .pipeline import PipelineConfig, StreamedCache, open_loader, plan_step
from .latents import image_ids
from .request import RequestState
from .transformer.cache_view import StepCache
from .transformer.reference import dense_forward
from .transformer.sparse import PackedStep, sparse_forward

log = logging.getLogger(__name__)


def renoise(image_latents: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The template's latents at noise level sigma: same arithmetic as FlowMatch `scale_noise`."""
    sigma = sigma.to(image_latents.dtype)
    return sigma * noise + (1.0 - sigma) * image_latents


def batch_key(state: RequestState) -> tuple:
    """Requests may share a step only if these agree (resolution, text length, cache mode, path)."""
    m = state.manifest
    return (m.model_id, m.resolution, m.cache_mode, state.text.prompt_embeds.shape[1], state.request.path)


@torch.no_grad()
def denoise_step(transformer, states: list[RequestState], use_cache: list[bool] | None = None,
                 pipeline: PipelineConfig | None = None, *, predict=None, advance=None) -> dict[str, str]:
    """Advance every state by one step; all must share `batch_key`.

    `predict(transformer, states, shards, use_cache, path, pipeline)` -> (sequences, ...) model outputs and
    `advance(state, pred)` are the family's (default: Flux, below; the UNet's are in unet/step.py).

    Returns {request_id: error} for requests that failed on their own (their cache could not be read, their
    scheduler step raised); those are left untouched and the others advance. An error of the shared
    transformer call propagates: the caller decides how to isolate it (see EngineLoop).
    """
    predict, advance = predict or _predict, advance or _advance
    failed: dict[str, str] = {}
    if not states:
        return failed
    keys = {batch_key(s) for s in states}
    if len(keys) != 1:
        raise ValueError(f"states of different batch keys cannot share a step: {sorted(map(str, keys))}")
    start = time.perf_counter()
    shards = {}
    for s in states:
        if s.degraded is not None or s.request.path == "full":
            continue  # a full recompute needs no cache
        try:
            shards[id(s)] = s.cache(s.step_index)
        except (CacheIntegrityError, CacheUnavailableError) as exc:
            if s.request.fallback_to_full:
                s.degraded = f"{type(exc).__name__} at step {s.step_index}: {exc}"
                log.warning("request %s continues without cache: %s", s.request.request_id, s.degraded)
            else:
                failed[s.request.request_id] = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - one request's cache problem must not stop the batch
            failed[s.request.request_id] = f"{type(exc).__name__}: {exc}"
    states = [s for s in states if s.request.request_id not in failed]
    cached = [s for s in states if s.degraded is None]
    fallback = [s for s in states if s.degraded is not None]
    preds = {}
    if cached:
        out = predict(transformer, cached, shards, use_cache, cached[0].request.path, pipeline)
        preds.update(_by_state(cached, out))
    if fallback:  # cache lost: these compute every token, like a request that never had a cache
        preds.update(_by_state(fallback, predict(transformer, fallback, {}, None, "full", None)))
    elapsed = time.perf_counter() - start
    for s in states:
        try:
            advance(s, preds[id(s)])
        except Exception as exc:  # noqa: BLE001
            failed[s.request.request_id] = f"{type(exc).__name__}: {exc}"
        s.step_times.append(elapsed)
    return failed


def _by_state(states: list[RequestState], preds: torch.Tensor) -> dict[int, torch.Tensor]:
    out, offset = {}, 0
    for s in states:
        out[id(s)] = preds[offset:offset + s.branches]
        offset += s.branches
    return out


def _predict(transformer, states: list[RequestState], shards: dict, use_cache, path: str,
             pipeline: PipelineConfig | None = None) -> torch.Tensor:
    """Transformer output for every sequence (request x guidance branch), (S, N, 4C)."""
    first = states[0]
    mode = first.manifest.cache_mode
    h, w = (r // _scale(first) for r in first.manifest.resolution)
    device, dtype = first.latents.device, first.latents.dtype
    img_ids = image_ids(h, w, device, dtype)
    txt_ids = first.text.text_ids

    seqs = [(s, g) for s in states for g in range(s.branches)]
    prompt_embeds = torch.cat([s.text.prompt_embeds[g:g + 1] for s, g in seqs])
    pooled = torch.cat([s.text.pooled[g:g + 1] for s, g in seqs])
    timestep = torch.stack([s.timesteps[s.step_index].to(dtype) / 1000 for s, _ in seqs])
    guidance = torch.cat([s.guidance for s, _ in seqs]) if first.guidance is not None else None
    caches = [StepCache(shards[id(s)], g, device) for s, g in seqs] if path != "full" else []

    if path == "sparse":
        loader = None
        if pipeline is not None:
            # Stream this step's shards block by block, overlapped with compute (bubble-free pipeline).
            shard_list = [shards[id(s)] for s in states]
            position = {id(s): i for i, s in enumerate(states)}
            n_blocks = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
            plan = plan_step(pipeline, mode, shard_list, n_blocks, sum(int(s.mask.index.numel()) for s, _ in seqs),
                             len(seqs) * first.latents.shape[1])
            use_cache = plan.use_cache if plan is not None else (use_cache or [True] * n_blocks)
            loader = open_loader(pipeline, shard_list, n_blocks, use_cache)
            caches = [StreamedCache(loader, position[id(s)], g) for s, g in seqs]
        inputs = {id(s): s.model_input() for s in states}
        step = PackedStep(
            x=torch.cat([inputs[id(s)][0, s.mask.index] for s, _ in seqs]),
            token_index=[s.mask.index for s, _ in seqs],
            prompt_embeds=prompt_embeds, pooled=pooled, timestep=timestep, txt_ids=txt_ids, img_ids=img_ids,
            caches=caches, mode=mode, guidance=guidance, use_cache=use_cache,
            x_full=torch.cat([inputs[id(s)] for s, _ in seqs]) if mode == "y" else None,
            cond_keys=[(cond_digest(s)[g], s.step_index) for s, g in seqs],
            cond_ahead=[([(cond_digest(s)[g], j) for j in range(s.step_index + 1, s.total_steps)],
                         s.timesteps[s.step_index + 1:]) for s, g in seqs],
        )
        try:
            packed = sparse_forward(transformer, step)
        finally:
            if loader is not None:
                loader.close()
                pipeline.keep(loader.report(), plan)
        preds = []
        for (s, _), part in zip(seqs, packed.split([int(s.mask.index.numel()) for s, _ in seqs])):
            full = torch.zeros_like(s.latents[0])
            full[s.mask.index] = part
            preds.append(full)
        return torch.stack(preds)
    latents = torch.cat([s.model_input() for s, _ in seqs])
    if path == "dense":
        keep = torch.stack([s.mask.tokens for s, _ in seqs])
        return dense_forward(transformer, latents, prompt_embeds, pooled, timestep, txt_ids, img_ids, guidance,
                             mode=mode, caches=caches, keep=keep, use_cache=use_cache)
    return dense_forward(transformer, latents, prompt_embeds, pooled, timestep, txt_ids, img_ids, guidance)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().reshape(-1).cpu().contiguous()
    return str(t.dtype).encode() + t.view(torch.uint8).numpy().tobytes()


def cond_digest(s: RequestState) -> list[bytes]:
    """Per branch, a digest of the pooled prompt, the timestep schedule and the guidance: with the step index
    it fixes the AdaLN conditioning exactly, so requests with equal digests share modulation rows. Computed
    once per request (one device->host read), never per step."""
    if s.cond_digest is None:
        common = _tensor_bytes(s.timesteps) + (b"" if s.guidance is None else _tensor_bytes(s.guidance))
        s.cond_digest = [hashlib.sha256(_tensor_bytes(s.text.pooled[g]) + common).digest()
                         for g in range(s.branches)]
    return s.cond_digest


def _scale(state: RequestState) -> int:
    n = state.manifest.image_tokens
    h, w = state.manifest.resolution
    # tokens = (h / s / 2) * (w / s / 2)  ->  s = sqrt(h * w / (4 n))
    return int(round((h * w / (4 * n)) ** 0.5))


def _advance(s: RequestState, pred: torch.Tensor) -> None:
    """Guidance, the request's own scheduler step, then pin unmasked latents to the template trajectory."""
    if s.cfg_scale is not None:
        noise_pred = pred[0:1] + s.cfg_scale * (pred[1:2] - pred[0:1])
    else:
        noise_pred = pred[0:1]
    i = s.step_index
    latents = s.scheduler.step(noise_pred, s.timesteps[i], s.latents, return_dict=False)[0]
    pinned = s.image_latents if i == s.total_steps - 1 else renoise(s.image_latents, s.sigmas[i + 1], s.noise)
    s.latents = (1 - s.mask.blend) * pinned + s.mask.blend * latents
    s.step_index += 1
