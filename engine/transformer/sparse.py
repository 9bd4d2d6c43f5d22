"""Mask-aware forward of a Flux transformer: only masked image tokens (+ text) flow through the blocks.

Several sequences are packed into one batch: their computed tokens are concatenated so every per-token layer
(projections, MLPs, norms) runs once for the whole batch, AdaLN modulation reaches each token through a
token->sequence index, and attention runs per sequence segment against that sequence's own keys/values.
Sequences may sit at different timesteps and have different mask sizes.

Two cache modes (see cache_view.py):
  * "kv": keys/values of unmasked image tokens come from the template cache; masked rows are replaced by
    fresh values (on CPU without copying the cache: attention.split_attention). Cheapest; nothing but
    masked + text tokens is ever projected.
  * "y": each block's full-length input is rebuilt from the cached output of the previous block with the
    masked rows refreshed; K/V are projected from it for all tokens, Q/attention/MLP for masked tokens only.
    Because every block sees its full input, any block can instead be computed in full (`use_cache=False`),
    which is what the load/compute planner needs.

The per-block arithmetic lives in sparse_blocks.py; this module packs the batch and runs the stack.
"""
from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

from .attention import lse_split_available, stale_mask
from .cache_view import BlockCache
from .modulation import Modulation, modulation_cache
from .sparse_blocks import Packed, block_full, dual_block, linear, modulated, rope_table, single_block


@dataclass
class PackedStep:
    """Inputs of one transformer call over S packed sequences."""

    x: torch.Tensor  # (Ntot, C_in) inputs of the computed image tokens, sequence after sequence
    token_index: list[torch.Tensor]  # per sequence, (M_s,) positions of its computed tokens among N
    prompt_embeds: torch.Tensor  # (S, T, joint_attention_dim)
    pooled: torch.Tensor  # (S, pooled_dim)
    timestep: torch.Tensor  # (S,), sigma in [0, 1] (the pipelines pass t / 1000)
    txt_ids: torch.Tensor  # (T, 3)
    img_ids: torch.Tensor  # (N, 3)
    caches: list[BlockCache]
    mode: str = "kv"
    guidance: torch.Tensor | None = None  # (S,) for guidance-distilled models
    x_full: torch.Tensor | None = None  # (S, N, C_in) every image token's input; Y mode only
    use_cache: list[bool] | None = None  # per block, Y mode only; None = every block uses the cache
    #: per sequence, a key that determines its (pooled prompt, timestep, guidance) exactly: sequences with equal
    #: keys share AdaLN modulation rows across calls (modulation.py). None = compute them every call.
    cond_keys: list[Hashable] | None = None
    #: per sequence, (cond keys of its next steps, their scheduler timesteps (K,), i.e. 1000 x `timestep`,
    #: converted only on a miss): when its rows are computed, those of the next steps are computed with them
    #: (modulation.py, look-ahead)
    cond_ahead: list[tuple[list[Hashable], torch.Tensor]] | None = None

    @property
    def num_sequences(self) -> int:
        return len(self.token_index)


@torch.no_grad()
def sparse_forward(transformer, step: PackedStep) -> torch.Tensor:
    """Noise prediction for the packed computed tokens, (Ntot, C_out)."""
    tr = transformer
    if step.mode not in ("kv", "y"):
        raise ValueError(f"unknown cache mode {step.mode!r}; expected 'kv' or 'y'")
    if step.cond_keys is not None and len(step.cond_keys) != step.num_sequences:
        raise ValueError(f"{len(step.cond_keys)} cond_keys for {step.num_sequences} sequences")
    if step.cond_ahead is not None and len(step.cond_ahead) != step.num_sequences:
        raise ValueError(f"{len(step.cond_ahead)} cond_ahead entries for {step.num_sequences} sequences")
    device, dtype = step.x.device, step.x.dtype
    num_dual = len(tr.transformer_blocks)
    num_blocks = num_dual + len(tr.single_transformer_blocks)
    use_cache = step.use_cache or [True] * num_blocks
    if step.mode == "kv" and not all(use_cache):
        raise ValueError("computing a block in full needs Y-mode caches (KV mode never materialises unmasked tokens)")
    n_txt = step.prompt_embeds.shape[1]
    freqs = rope_table(tr, step.txt_ids, step.img_ids)
    pack = Packed(step.token_index, n_txt, freqs, step.caches, step.mode, device)

    # Embeddings, exactly as FluxTransformer2DModel.forward computes them.
    h_img = linear(tr.x_embedder, step.x)
    txt = linear(tr.context_embedder, step.prompt_embeds)
    cache = modulation_cache(tr)
    ahead = None if step.cond_ahead is None else [keys for keys, _ in step.cond_ahead]
    rows = cache.rows(lambda rows: _temb(tr, step, dtype, rows), step.cond_keys, ahead,
                      lambda s, count: _temb_ahead(tr, step, dtype, s, count))
    mod = Modulation(cache, rows)
    if step.mode == "kv" and lse_split_available(device, dtype):
        n_img = step.img_ids.shape[0]
        pack.stale = [stale_mask(n_img, idx, dtype, device) for idx in step.token_index]

    full_in = None  # Y mode: (S, N, hidden) input of the current block for every image token
    if step.mode == "y":
        if step.x_full is None:
            raise ValueError("Y mode needs x_full, the inputs of every image token")
        full_in = linear(tr.x_embedder, step.x_full)

    temb = None  # the raw conditioning vector, only for blocks computed in full by the stock module
    for j, block in enumerate(tr.transformer_blocks):
        if not use_cache[j]:
            temb = _temb(tr, step, dtype, None) if temb is None else temb
            txt, full_in = block_full(block, full_in, txt, temb, pack)
            h_img = pack.gather(full_in)
            continue
        h_img, txt = dual_block(block, j, h_img, txt, mod, pack, full_in)
        if step.mode == "y":
            full_in = _refresh_full(step.caches, j, h_img, pack)

    tokens = pack.join(txt, h_img)  # single blocks: [text | image] rows per sequence, contiguous
    for i, block in enumerate(tr.single_transformer_blocks):
        b = num_dual + i
        if not use_cache[b]:
            temb = _temb(tr, step, dtype, None) if temb is None else temb
            txt, full_in = block_full(block, full_in, pack.text_rows(tokens), temb, pack)
            tokens = pack.join(txt, pack.gather(full_in))
            continue
        tokens = single_block(block, b, tokens, mod.single(num_dual, i), pack, full_in)
        if step.mode == "y":
            full_in = _refresh_full(step.caches, b, pack.image_rows(tokens), pack)
    h_img = pack.image_rows(tokens)

    # AdaLayerNormContinuous: rows are (1 + scale, shift).
    scale1, shift = pack.per_token(mod.final()).chunk(2, dim=1)
    h_img = modulated(tr.norm_out.norm, h_img, shift, scale1)
    return linear(tr.proj_out, h_img)


def _temb(tr, step: PackedStep, dtype: torch.dtype, rows: list[int] | None) -> torch.Tensor:
    """Conditioning vectors of the listed sequences (all when None), as FluxTransformer2DModel computes them."""
    timestep, pooled, guidance = step.timestep, step.pooled, step.guidance
    if rows is not None and len(rows) != step.num_sequences:
        index = torch.tensor(rows, device=timestep.device)
        timestep, pooled = timestep[index], pooled[index.to(pooled.device)]
        guidance = None if guidance is None else guidance[index.to(guidance.device)]
    timestep = timestep.to(dtype) * 1000
    if guidance is not None:
        return tr.time_text_embed(timestep, guidance.to(dtype) * 1000, pooled)
    return tr.time_text_embed(timestep, pooled)


def _temb_ahead(tr, step: PackedStep, dtype: torch.dtype, s: int, count: int) -> torch.Tensor:
    """Conditioning vectors (count, hidden) of sequence s at its next `count` steps (`cond_ahead`)."""
    keys, timesteps = step.cond_ahead[s]
    if len(timesteps) < count or len(keys) != len(timesteps):
        raise ValueError(f"cond_ahead of sequence {s}: {len(keys)} keys, {len(timesteps)} timesteps")
    # the same arithmetic as the current step's path: the engine passes t.to(dtype) / 1000, `_temb` scales back
    timestep = (timesteps[:count].to(step.timestep.device, dtype) / 1000) * 1000
    pooled = step.pooled[s:s + 1].expand(count, -1)
    if step.guidance is not None:
        return tr.time_text_embed(timestep, step.guidance[s:s + 1].to(dtype).expand(count) * 1000, pooled)
    return tr.time_text_embed(timestep, pooled)


def _refresh_full(caches, block: int, h_img: torch.Tensor, pack: Packed) -> torch.Tensor:
    """Y mode: the next block's full input = this block's cached output with the masked rows refreshed."""
    rows = []
    for s, part in enumerate(pack.split(h_img)):
        y = caches[s].y(block).clone()
        y[pack.token_index[s]] = part
        rows.append(y)
    return torch.stack(rows)
