"""Mask-aware forward of a Flux transformer: only masked image tokens (+ text) flow through the blocks.

Several sequences are packed into one batch: their computed tokens are concatenated so every per-token layer
(projections, MLPs, norms) runs once for the whole batch, AdaLN modulation reaches each token through a
token->sequence index, and attention runs per sequence segment against that sequence's own keys/values.
Sequences may sit at different timesteps and have different mask sizes.

Two cache modes (see cache_view.py):
  * "kv": keys/values of unmasked image tokens come from the template cache; masked rows are overwritten
    with fresh values. Cheapest; nothing but masked + text tokens is ever projected.
  * "y": each block's full-length input is rebuilt from the cached output of the previous block with the
    masked rows refreshed; K/V are projected from it for all tokens, Q/attention/MLP for masked tokens only.
    Because every block sees its full input, any block can instead be computed in full (`use_cache=False`),
    which is what the load/compute planner needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cache_view import BlockCache
from .ops import apply_rope, segment_attention


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

    @property
    def num_sequences(self) -> int:
        return len(self.token_index)


class _Packing:
    """Index bookkeeping of a packed batch."""

    def __init__(self, token_index: list[torch.Tensor], device: torch.device):
        self.token_index = token_index
        self.lengths = [int(t.numel()) for t in token_index]
        self.seq = torch.repeat_interleave(
            torch.arange(len(token_index), device=device), torch.tensor(self.lengths, device=device)
        )
        self.positions = torch.cat(token_index) if token_index else torch.empty(0, dtype=torch.long)

    def split(self, t: torch.Tensor) -> list[torch.Tensor]:
        return list(t.split(self.lengths))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def _heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    return t.unflatten(-1, (-1, head_dim))


def _fused_linear(owner: torch.nn.Module, names: tuple[str, ...]):
    """Weights of several linears that read the same input, concatenated so one matmul serves them all.

    With few masked tokens a step is dominated by per-call overhead, so 3-4 small matmuls become one. Memoised
    on the module and rebuilt if any weight is replaced, moved or modified in place.
    """
    layers = [owner.get_submodule(n) for n in names]
    stamp = tuple((l.weight.data_ptr(), l.weight._version, l.bias.data_ptr(), l.bias._version) for l in layers)
    attr = "_instgenie_fused_" + "_".join(n.replace(".", "") for n in names)
    cached = owner.__dict__.get(attr)
    if cached is None or cached[0] != stamp:
        weight = torch.cat([l.weight for l in layers])
        bias = torch.cat([l.bias for l in layers])
        cached = (stamp, weight, bias, [l.weight.shape[0] for l in layers])
        owner.__dict__[attr] = cached
    return cached[1], cached[2], cached[3]


def _project(owner, names, x):
    weight, bias, sizes = _fused_linear(owner, names)
    return F.linear(x, weight, bias).split(sizes, dim=-1)


@torch.no_grad()
def sparse_forward(transformer, step: PackedStep) -> torch.Tensor:
    """Noise prediction for the packed computed tokens, (Ntot, C_out)."""
    tr = transformer
    if step.mode not in ("kv", "y"):
        raise ValueError(f"unknown cache mode {step.mode!r}; expected 'kv' or 'y'")
    device, dtype = step.x.device, step.x.dtype
    pack = _Packing(step.token_index, device)
    seq = pack.seq
    num_dual = len(tr.transformer_blocks)
    num_blocks = num_dual + len(tr.single_transformer_blocks)
    use_cache = step.use_cache or [True] * num_blocks
    if step.mode == "kv" and not all(use_cache):
        raise ValueError("computing a block in full needs Y-mode caches (KV mode never materialises unmasked tokens)")

    # Embeddings, exactly as FluxTransformer2DModel.forward computes them.
    h_img = tr.x_embedder(step.x)
    timestep = step.timestep.to(dtype) * 1000
    if step.guidance is not None:
        temb = tr.time_text_embed(timestep, step.guidance.to(dtype) * 1000, step.pooled)
    else:
        temb = tr.time_text_embed(timestep, step.pooled)
    txt = tr.context_embedder(step.prompt_embeds)
    n_txt = txt.shape[1]
    cos, sin = _rope_tables(tr, step.txt_ids, step.img_ids)
    cos_txt, sin_txt = cos[:n_txt], sin[:n_txt]
    cos_img_all, sin_img_all = cos[n_txt:], sin[n_txt:]
    cos_img, sin_img = cos_img_all[pack.positions], sin_img_all[pack.positions]

    full_in = None  # Y mode: (S, N, hidden) input of the current block for every image token
    if step.mode == "y":
        if step.x_full is None:
            raise ValueError("Y mode needs x_full, the inputs of every image token")
        full_in = tr.x_embedder(step.x_full)

    blocks = [(b, blk, _dual_block) for b, blk in enumerate(tr.transformer_blocks)]
    blocks += [(num_dual + j, blk, _single_block) for j, blk in enumerate(tr.single_transformer_blocks)]
    for b, block, sparse_block in blocks:
        if step.mode == "y" and not use_cache[b]:
            h_img, txt, full_in = _block_full(block, full_in, txt, temb, cos_txt, sin_txt, cos_img_all,
                                              sin_img_all, pack)
            continue
        h_img, txt = sparse_block(block, b, h_img, txt, temb, seq, pack, step, cos_txt, sin_txt, cos_img, sin_img,
                                  cos_img_all, sin_img_all, full_in)
        if step.mode == "y":
            full_in = _refresh_full(step.caches, b, h_img, pack)

    # AdaLayerNormContinuous: note the (scale, shift) order.
    emb = tr.norm_out.linear(tr.norm_out.silu(temb).to(h_img.dtype))
    scale, shift = torch.chunk(emb, 2, dim=1)
    h_img = tr.norm_out.norm(h_img) * (1 + scale[seq]) + shift[seq]
    return tr.proj_out(h_img)


_ROPE_CACHE: dict = {}


def _rope_tables(tr, txt_ids: torch.Tensor, img_ids: torch.Tensor):
    """RoPE cos/sin of [text, image] positions; memoised, as every step of every request reuses them."""
    ids = torch.cat((txt_ids, img_ids), dim=0)
    key = (id(tr), ids.shape, ids.device, hash(ids.cpu().numpy().tobytes()))
    tables = _ROPE_CACHE.get(key)
    if tables is None:  # read once, return the local: another thread may clear the memo meanwhile
        if len(_ROPE_CACHE) > 16:
            _ROPE_CACHE.clear()
        tables = _ROPE_CACHE[key] = tr.pos_embed(ids)
    return tables


def _refresh_full(caches, block: int, h_img: torch.Tensor, pack: _Packing) -> torch.Tensor:
    """Y mode: the next block's full input = this block's cached output with the masked rows refreshed."""
    rows = []
    for s, part in enumerate(pack.split(h_img)):
        y = caches[s].y(block).clone()
        y[pack.token_index[s]] = part
        rows.append(y)
    return torch.stack(rows)


def _kv_buffers(caches, block, txt_k, txt_v, k_new, v_new, pack):
    """KV mode, per sequence: [text K/V | the template's image K/V with masked rows replaced by fresh ones].

    Built head-major in one buffer per tensor, so the cached rows are copied exactly once per block.
    """
    keys, values = [], []
    n_txt = txt_k.shape[1]
    for s, (k_part, v_part) in enumerate(zip(pack.split(k_new), pack.split(v_new))):
        k_cached, v_cached = caches[s].kv(block)
        rows = pack.token_index[s] + n_txt
        bufs = []
        for cached, fresh, txt in ((k_cached, k_part, txt_k[s]), (v_cached, v_part, txt_v[s])):
            heads, n, d = cached.shape
            buf = torch.empty(heads, n_txt + n, d, dtype=fresh.dtype, device=fresh.device)
            buf[:, :n_txt] = txt.transpose(0, 1)
            buf[:, n_txt:] = cached
            buf[:, rows] = fresh.transpose(0, 1)
            bufs.append(buf)
        keys.append(bufs[0])
        values.append(bufs[1])
    return keys, values


def _full_kv_buffers(attn, norm_full, cos_all, sin_all, txt_k, txt_v):
    """Y mode: [text K/V | K/V of every image token projected from the rebuilt full input], head-major."""
    d = attn.head_dim
    k, v = _project(attn, ("to_k", "to_v"), norm_full)
    k = attn.norm_k(_heads(k, d))
    v = _heads(v, d)
    s, n = k.shape[:2]
    k = apply_rope(k.flatten(0, 1), cos_all.repeat(s, 1), sin_all.repeat(s, 1)).unflatten(0, (s, n))
    keys = torch.cat([txt_k, k], dim=1).transpose(1, 2)
    values = torch.cat([txt_v, v], dim=1).transpose(1, 2)
    return list(keys), list(values)


def _dual_block(block, b, h_img, txt, temb, seq, pack, step, cos_txt, sin_txt, cos_img, sin_img,
                cos_all, sin_all, full_in):
    attn = block.attn
    d = attn.head_dim
    emb = block.norm1.linear(block.norm1.silu(temb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
    c_emb = block.norm1_context.linear(block.norm1_context.silu(temb))
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_emb.chunk(6, dim=1)

    n_img = _modulate(block.norm1.norm(h_img), shift_msa[seq], scale_msa[seq])
    n_txt = block.norm1_context.norm(txt) * (1 + c_scale_msa[:, None]) + c_shift_msa[:, None]

    if step.mode == "kv":
        q, k, v = _project(attn, ("to_q", "to_k", "to_v"), n_img)
    else:
        q = attn.to_q(n_img)
    q = apply_rope(attn.norm_q(_heads(q, d)), cos_img, sin_img)
    tq, tk, tv = _project(attn, ("add_q_proj", "add_k_proj", "add_v_proj"), n_txt)
    tq = attn.norm_added_q(_heads(tq, d))
    tk = attn.norm_added_k(_heads(tk, d))
    tv = _heads(tv, d)
    s_count, n_txt_tokens = tq.shape[:2]
    tq = apply_rope(tq.flatten(0, 1), cos_txt.repeat(s_count, 1), sin_txt.repeat(s_count, 1)).unflatten(0, tq.shape[:2])
    tk = apply_rope(tk.flatten(0, 1), cos_txt.repeat(s_count, 1), sin_txt.repeat(s_count, 1)).unflatten(0, tk.shape[:2])

    if step.mode == "kv":
        k = apply_rope(attn.norm_k(_heads(k, d)), cos_img, sin_img)
        v = _heads(v, d)
        keys, values = _kv_buffers(step.caches, b, tk, tv, k, v, pack)
    else:
        norm_full = block.norm1.norm(full_in) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        keys, values = _full_kv_buffers(attn, norm_full, cos_all, sin_all, tk, tv)

    out = segment_attention([torch.cat([tq[s], qs]) for s, qs in enumerate(pack.split(q))], keys, values)
    txt_attn = torch.stack([o[:n_txt_tokens] for o in out]).to(q.dtype)
    img_attn = torch.cat([o[n_txt_tokens:] for o in out]).to(q.dtype)
    img_attn = attn.to_out[1](attn.to_out[0](img_attn))
    txt_attn = attn.to_add_out(txt_attn)

    h_img = h_img + gate_msa[seq] * img_attn
    n2 = _modulate(block.norm2(h_img), shift_mlp[seq], scale_mlp[seq])
    h_img = h_img + gate_mlp[seq] * block.ff(n2)

    txt = txt + c_gate_msa[:, None] * txt_attn
    n2c = block.norm2_context(txt) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    txt = txt + c_gate_mlp[:, None] * block.ff_context(n2c)
    if txt.dtype == torch.float16:
        txt = txt.clip(-65504, 65504)
    return h_img, txt


def _single_block(block, b, h_img, txt, temb, seq, pack, step, cos_txt, sin_txt, cos_img, sin_img,
                  cos_all, sin_all, full_in):
    attn = block.attn
    d = attn.head_dim
    s_count, n_txt_tokens, hidden = txt.shape
    # Text rows join the packed image rows so every per-token layer runs once.
    tokens = torch.cat([txt.flatten(0, 1), h_img])
    txt_seq = torch.arange(s_count, device=seq.device).repeat_interleave(n_txt_tokens)
    tok_seq = torch.cat([txt_seq, seq])
    cos_tok = torch.cat([cos_txt.repeat(s_count, 1), cos_img])
    sin_tok = torch.cat([sin_txt.repeat(s_count, 1), sin_img])

    emb = block.norm.linear(block.norm.silu(temb))
    shift, scale, gate = emb.chunk(3, dim=1)
    normed = _modulate(block.norm.norm(tokens), shift[tok_seq], scale[tok_seq])
    q, k, v, mlp = _project(block, ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), normed)
    mlp = block.act_mlp(mlp)
    q = apply_rope(attn.norm_q(_heads(q, d)), cos_tok, sin_tok)
    n_t = s_count * n_txt_tokens
    q_txt, q_img = q[:n_t].unflatten(0, (s_count, n_txt_tokens)), q[n_t:]

    if step.mode == "kv":
        k = apply_rope(attn.norm_k(_heads(k, d)), cos_tok, sin_tok)
        v = _heads(v, d)
        k_txt, v_txt = k[:n_t].unflatten(0, (s_count, n_txt_tokens)), v[:n_t].unflatten(0, (s_count, n_txt_tokens))
        keys, values = _kv_buffers(step.caches, b, k_txt, v_txt, k[n_t:], v[n_t:], pack)
    else:
        # Text rows keep their fresh K/V; the masked image rows' K/V come from the rebuilt full input below.
        k_txt = apply_rope(attn.norm_k(_heads(k[:n_t], d)), cos_tok[:n_t], sin_tok[:n_t])
        v_txt = _heads(v[:n_t], d)
        k_txt, v_txt = k_txt.unflatten(0, (s_count, n_txt_tokens)), v_txt.unflatten(0, (s_count, n_txt_tokens))
        norm_full = block.norm.norm(full_in) * (1 + scale[:, None]) + shift[:, None]
        keys, values = _full_kv_buffers(attn, norm_full, cos_all, sin_all, k_txt, v_txt)

    out = segment_attention([torch.cat([q_txt[s], qs]) for s, qs in enumerate(pack.split(q_img))], keys, values)
    attn_out = torch.cat([torch.cat([o[:n_txt_tokens] for o in out]), torch.cat([o[n_txt_tokens:] for o in out])])
    attn_out = attn_out.to(q.dtype)
    tokens = tokens + gate[tok_seq] * block.proj_out(torch.cat([attn_out, mlp], dim=1))
    if tokens.dtype == torch.float16:
        tokens = tokens.clip(-65504, 65504)
    return tokens[n_t:], tokens[:n_t].unflatten(0, (s_count, n_txt_tokens))


def _block_full(block, full_in, txt, temb, cos_txt, sin_txt, cos_all, sin_all, pack):
    """Y mode, block chosen for full compute: run the stock block on every image token."""
    rope = (torch.cat([cos_txt, cos_all]), torch.cat([sin_txt, sin_all]))
    txt, full_out = block(hidden_states=full_in, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rope)
    return _gather(full_out, pack), txt, full_out


def _gather(full: torch.Tensor, pack: _Packing) -> torch.Tensor:
    return torch.cat([full[s, idx] for s, idx in enumerate(pack.token_index)])
