"""Dense forward: the stock diffusers Flux forward, optionally recording or substituting cached activations.

It is three things at once:
  * template registration: run every token and record per block the image K/V ("kv") or output ("y");
  * the stock model: with nothing recorded or substituted it *is* `transformer(...)`;
  * the correctness oracle of the sparse path: every token is computed, but unmasked image rows of K/V
    (KV mode) or of block outputs (Y mode) are replaced by the template's cache, which is exactly what the
    sparse path assumes. Sparse output rows must match these within float tolerance.
Attention processors and forward hooks are swapped in for the call and restored afterwards.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from .cache_view import BlockCache, tensor_name


@dataclass
class _Capture:
    mode: str
    n_txt: int
    record: dict[str, torch.Tensor] | None = None
    caches: list[BlockCache] | None = None
    keep: torch.Tensor | None = None  # (S, N) True where the token is computed fresh (masked)
    use_cache: list[bool] | None = None
    hooks: list = field(default_factory=list)

    def substitutes(self, block: int) -> bool:
        return self.caches is not None and (self.use_cache is None or self.use_cache[block])


class _RecordingAttnProcessor:
    """diffusers' FluxAttnProcessor with a tap on the image K/V after QK-norm and RoPE."""

    def __init__(self, capture: _Capture, block: int):
        self.capture, self.block = capture, block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        cap, t = self.capture, self.capture.n_txt
        if cap.record is not None:
            cap.record[tensor_name("kv", self.block, "k")] = key[:, t:].transpose(1, 2).contiguous()
            cap.record[tensor_name("kv", self.block, "v")] = value[:, t:].transpose(1, 2).contiguous()
        if cap.substitutes(self.block):
            key, value = key.clone(), value.clone()
            for s, cache in enumerate(cap.caches):
                k_cached, v_cached = cache.kv(self.block)
                stale = ~cap.keep[s]
                key[s, t:][stale] = k_cached.transpose(0, 1)[stale]
                value[s, t:][stale] = v_cached.transpose(0, 1)[stale]

        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_out, out = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            return out, attn.to_add_out(encoder_out.contiguous())
        return out


def _y_hook(capture: _Capture, block: int):
    def hook(module, args, output):
        encoder_out, image_out = output
        if capture.record is not None:
            capture.record[tensor_name("y", block)] = image_out.clone()
        if capture.substitutes(block):
            image_out = image_out.clone()
            for s, cache in enumerate(capture.caches):
                stale = ~capture.keep[s]
                image_out[s][stale] = cache.y(block)[stale]
        return encoder_out, image_out

    return hook


@contextlib.contextmanager
def _instrumented(transformer, capture: _Capture):
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    saved = [blk.attn.processor for blk in blocks]
    try:
        for i, blk in enumerate(blocks):
            if capture.mode == "kv":
                blk.attn.set_processor(_RecordingAttnProcessor(capture, i))
            else:
                capture.hooks.append(blk.register_forward_hook(_y_hook(capture, i)))
        yield
    finally:
        for blk, proc in zip(blocks, saved):
            blk.attn.set_processor(proc)
        for h in capture.hooks:
            h.remove()


@torch.no_grad()
def dense_forward(
    transformer,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    timestep: torch.Tensor,
    txt_ids: torch.Tensor,
    img_ids: torch.Tensor,
    guidance: torch.Tensor | None = None,
    *,
    mode: str | None = None,
    record: dict[str, torch.Tensor] | None = None,
    caches: list[BlockCache] | None = None,
    keep: torch.Tensor | None = None,
    use_cache: list[bool] | None = None,
) -> torch.Tensor:
    """Transformer output for every image token, (S, N, C_out).

    mode=None runs the untouched stock forward. With `record`, the dict receives per block the tensors the
    template cache stores. With `caches` (one per sequence) and `keep` (S, N), unmasked rows are substituted.
    """
    call = dict(
        hidden_states=latents, encoder_hidden_states=prompt_embeds, pooled_projections=pooled,
        timestep=timestep, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False,
    )
    if mode is None:
        return transformer(**call)[0]
    capture = _Capture(mode=mode, n_txt=prompt_embeds.shape[1], record=record, caches=caches, keep=keep,
                       use_cache=use_cache)
    with _instrumented(transformer, capture):
        return transformer(**call)[0]
