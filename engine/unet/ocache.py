"""The paper's O-caching on a UNet: per BasicTransformerBlock per step, the self-attention output of every token.

A template run records `attn1`'s output (after `to_out`) of every transformer block. An edit then computes, in
each block's self-attention, Q for the masked tokens only and K/V from the full *current* hidden states; the
masked rows of the output are fresh, the unmasked rows come from the template's cache. Everything else
(convolutions, ResNets, cross-attention, feed-forward) runs in full, which is why the UNet speedup is modest
(the paper: 1.3x for SD2.1 at m = 0.2).

The dense oracle computes every row of attn1 in full and then replaces the unmasked rows by the cache: the
sparse path must match it to float tolerance. Masks reach each UNet level by max-pooling the latent mask (a
token of a coarse level is masked if any latent cell under it is), as the artifact's `_prepare_mask_indices`.

Taps are installed once and act per thread (as transformer/reference.py), so a registration may record while
the engine loop edits on the same UNet.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ModelLoadError
from ..processors import WrappingProcessor


def o_name(block: int) -> str:
    """Shard key of block `block`'s self-attention output: (G, L, C) with L the tokens of its level."""
    return f"o.{block}"


def self_attention_blocks(unet) -> list:
    """Every BasicTransformerBlock of the UNet in module registration order: the cache's block numbering."""
    return [m for _, m in _named_blocks(unet)]


def block_levels(unet) -> list[int]:
    """Per cached block (self_attention_blocks order), its UNet level: 0 = the latent grid, each next halves it."""
    levels = len(unet.config.block_out_channels)
    out = []
    for name, _ in _named_blocks(unet):
        part, _, rest = name.partition(".")
        if part == "down_blocks":
            out.append(int(rest.split(".")[0]))
        elif part == "up_blocks":
            out.append(levels - 1 - int(rest.split(".")[0]))
        else:  # mid_block
            out.append(levels - 1)
    return out


def _named_blocks(unet):
    from diffusers.models.attention import BasicTransformerBlock

    return [(n, m) for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]


def o_cache_bytes(unet, latent_hw: tuple[int, int], steps: int, branches: int, element_bytes: int) -> int:
    """Bytes of a template's O-cache: per step, branch and block, the block's level tokens x its channels.

    steps * G * sum_b (h / 2^level_b) * (w / 2^level_b) * C_b * bytes_per_element
    """
    h, w = latent_hw
    per_step = sum((h >> lv) * (w >> lv) * blk.attn1.to_out[0].out_features
                   for lv, blk in zip(block_levels(unet), self_attention_blocks(unet)))
    return steps * branches * per_step * element_bytes


def level_masks(latent_keep: torch.Tensor, levels: int) -> dict[int, torch.Tensor]:
    """(S, h, w) bool latent mask -> {tokens L: (S, L) bool} for the latent grid and `levels - 1` halvings."""
    m = latent_keep.float()[:, None]
    out = {}
    for _ in range(levels):
        out[m.shape[-2] * m.shape[-1]] = m.flatten(1).bool()
        m = F.max_pool2d(m, 2)
    return out


@dataclass
class OCapture:
    """What the UNet forward running on this thread does in its self-attentions."""

    #: receives `o.<b>` -> (S, L, C) when recording a template run
    record: dict[str, torch.Tensor] | None = None
    #: per sequence (shard of this step, guidance branch): the template's attn1 outputs
    caches: list[tuple[dict[str, torch.Tensor], int]] | None = None
    #: tokens L of a level -> (S, L) bool, True where the token is computed fresh (masked)
    keep: dict[int, torch.Tensor] | None = None
    #: True: Q for masked tokens only (the edit); False: every row computed, unmasked substituted (the oracle)
    sparse: bool = True
    owner: object = None

    def cached(self, s: int, block: int) -> torch.Tensor:
        shard, g = self.caches[s]
        return shard[o_name(block)][g]


_active = threading.local()
_install_lock = threading.Lock()


def _capture_for(unet) -> OCapture | None:
    cap = getattr(_active, "capture", None)
    return cap if cap is not None and cap.owner is unet else None


class OCacheProcessor(WrappingProcessor):
    """Installed on every `attn1` once; the original processor unless this thread's forward records or edits."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        cap = _capture_for(self.owner)
        if cap is None or (cap.caches is not None and cap.sparse):
            if cap is None:
                return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
            return _masked_query_attention(cap, self.block, attn, hidden_states)
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if cap.record is not None:
            cap.record[o_name(self.block)] = out.detach().clone()
        if cap.caches is not None:  # the dense oracle: every row computed, unmasked ones replaced
            out = out.clone()
            keep = cap.keep[out.shape[1]]
            for s in range(out.shape[0]):
                stale = ~keep[s]
                out[s][stale] = cap.cached(s, self.block)[stale].to(out.dtype)
        return out


def _masked_query_attention(cap: OCapture, block: int, attn, hidden_states: torch.Tensor) -> torch.Tensor:
    """attn1 for masked queries only (AttnProcessor2_0's arithmetic), K/V of every current token.

    Linear layers run once over all sequences (K/V over every token, Q and the out-projection over the
    concatenated masked rows); attention runs per sequence, each against its own keys.
    """
    seqs, length, _ = hidden_states.shape
    keep = cap.keep[length]
    index = [keep[s].nonzero().flatten() for s in range(seqs)]
    counts = [int(i.numel()) for i in index]
    key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
    heads = attn.heads
    head_dim = key.shape[-1] // heads
    query = attn.to_q(torch.cat([hidden_states[s, idx] for s, idx in enumerate(index)]))
    outs = []
    for s, q in enumerate(query.split(counts)):
        if counts[s] == 0:
            outs.append(q.new_zeros(0, heads * head_dim))
            continue
        q = q.view(1, -1, heads, head_dim).transpose(1, 2)
        k = key[s:s + 1].view(1, -1, heads, head_dim).transpose(1, 2)
        v = value[s:s + 1].view(1, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        outs.append(o.transpose(1, 2).reshape(-1, heads * head_dim).to(q.dtype))
    fresh = attn.to_out[1](attn.to_out[0](torch.cat(outs))) / attn.rescale_output_factor
    out = torch.stack([cap.cached(s, block).to(hidden_states.dtype) for s in range(seqs)]).clone()
    for s, part in enumerate(fresh.split(counts)):
        out[s, index[s]] = part
    return out


def instrument_unet(unet) -> None:
    """Install the per-thread O-cache taps on every attn1 (idempotent; before the UNet is shared).

    The masked-query path reproduces a plain self-attention only; diffusers' BasicTransformerBlock builds its
    attn1 without group norm, spatial norm or a residual, so a UNet with them is refused here, once, at load
    time, rather than checked on every call."""
    blocks = self_attention_blocks(unet)
    for b, block in enumerate(blocks):
        attn = block.attn1
        if attn.group_norm is not None or attn.spatial_norm is not None or attn.residual_connection:
            raise ModelLoadError(f"self-attention block {b} of this UNet has a group norm, spatial norm or "
                                 "residual connection; O-caching supports plain self-attention only")
    with _install_lock:
        for b, block in enumerate(blocks):
            proc = block.attn1.processor
            if not (isinstance(proc, OCacheProcessor) and proc.owner is unet):
                block.attn1.set_processor(OCacheProcessor(proc, b, unet))


@contextlib.contextmanager
def activated(unet, capture: OCapture):
    """Make `capture` this thread's for the duration of one UNet forward."""
    instrument_unet(unet)
    if getattr(_active, "capture", None) is not None:
        raise RuntimeError("a UNet forward with O-cache taps is already active on this thread")
    capture.owner = unet
    _active.capture = capture
    try:
        yield
    finally:
        _active.capture = None
