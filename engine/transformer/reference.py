"""Dense forward: the stock diffusers Flux forward, optionally recording or substituting cached activations.

It is three things at once:
  * template registration: run every token and record per block the image K/V ("kv") or output ("y");
  * the stock model: with nothing recorded or substituted it *is* `transformer(...)`;
  * the correctness oracle of the sparse path: every token is computed, but unmasked image rows of K/V
    (KV mode) or of block outputs (Y mode) are replaced by the template's cache, which is exactly what the
    sparse path assumes. Sparse output rows must match these within float tolerance.
Recording and substitution are per thread: taps installed once on the shared transformer act only for the
thread whose dense forward is running (see `instrument`), so a registration may run beside the engine loop.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from ..processors import WrappingProcessor
from .cache_view import BlockCache, tensor_name


@dataclass
class _Capture:
    mode: str
    n_txt: int
    record: dict[str, torch.Tensor] | None = None
    caches: list[BlockCache] | None = None
    keep: torch.Tensor | None = None  # (S, N) True where the token is computed fresh (masked)
    use_cache: list[bool] | None = None
    owner: object = None  # the transformer this capture belongs to

    def substitutes(self, block: int) -> bool:
        return self.caches is not None and (self.use_cache is None or self.use_cache[block])


def _recording_attention(cap: _Capture, block: int, attn, hidden_states, encoder_hidden_states=None,
                         attention_mask=None, image_rotary_emb=None):
    """diffusers' FluxAttnProcessor with a tap on the image K/V after QK-norm and RoPE."""
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

    t = cap.n_txt
    if cap.record is not None:
        cap.record[tensor_name("kv", block, "k")] = key[:, t:].transpose(1, 2).contiguous()
        cap.record[tensor_name("kv", block, "v")] = value[:, t:].transpose(1, 2).contiguous()
    if cap.substitutes(block):
        key, value = key.clone(), value.clone()
        for s, cache in enumerate(cap.caches):
            k_cached, v_cached = cache.kv(block)
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


# The capture of the dense forward running on *this* thread, if any. The transformer is shared: the engine
# loop steps it while a registration records a template beside it, so the instrumentation is installed once
# and each call looks up its own thread's capture instead of swapping processors or hooks per call (which
# would make the other thread's forward record into, or substitute from, the wrong cache).
_active = threading.local()
_install_lock = threading.Lock()


def _capture_for(transformer) -> _Capture | None:
    cap = getattr(_active, "capture", None)
    return cap if cap is not None and cap.owner is transformer else None


class _DispatchingAttnProcessor(WrappingProcessor):
    """Installed on every block once; the block's own processor unless this thread's dense forward taps KV."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        cap = _capture_for(self.owner)
        if cap is None or cap.mode != "kv":
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return _recording_attention(cap, self.block, attn, hidden_states, encoder_hidden_states, attention_mask,
                                    image_rotary_emb)


def _y_hook(transformer, block: int):
    def hook(module, args, output):
        capture = _capture_for(transformer)
        if capture is None or capture.mode != "y":
            return None  # output unchanged
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


def instrument(transformer) -> None:
    """Install the per-thread recording/substitution taps on `transformer` (idempotent).

    Call it before the transformer is shared between threads (the Editor does so on construction): installing
    changes the blocks' processors and hook tables, which must not happen under another thread's forward.
    With no dense forward active on a thread, the taps call the original processors: stock results, bit for bit.
    """
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    with _install_lock:
        hooked = transformer.__dict__.setdefault("_instgenie_y_hooked", set())
        for i, blk in enumerate(blocks):
            proc = blk.attn.processor
            if not (isinstance(proc, _DispatchingAttnProcessor) and proc.owner is transformer):
                blk.attn.set_processor(_DispatchingAttnProcessor(proc, i, transformer))
            if i not in hooked:
                blk.register_forward_hook(_y_hook(transformer, i))
                hooked.add(i)


@contextlib.contextmanager
def _activated(transformer, capture: _Capture):
    instrument(transformer)
    if getattr(_active, "capture", None) is not None:
        raise RuntimeError("a dense forward is already active on this thread")
    _active.capture = capture
    try:
        yield
    finally:
        _active.capture = None


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
                       use_cache=use_cache, owner=transformer)
    with _activated(transformer, capture):
        return transformer(**call)[0]
