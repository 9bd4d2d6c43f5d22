"""Per-block arithmetic of the packed sparse forward: batch packing, RoPE, dual- and single-stream Flux blocks.

Written for few tokens per call: with a small mask a step is a few hundred rows, so per-op overhead matters as
much as the matrix products. Hence: fused Q/K/V(/MLP) projections, RoPE as one complex multiply, `addcmul`
for every modulate and gated residual, per-sequence modulation broadcast (not gathered) when one sequence is
packed, functional calls instead of module calls, and in the single-stream stack one [text | image] row block
per sequence, so each sequence's queries and fresh keys are views (no per-block concatenation).
Every operation is the one diffusers' FluxTransformer2DModel performs, on fewer rows.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .attention import segment_attention, split_attention

_ROPE_CACHE: dict = {}


def rope_table(tr, txt_ids: torch.Tensor, img_ids: torch.Tensor):
    """(cos, sin, complex) RoPE tables of [text, image] positions; memoised, every step of every request reuses them.

    cos/sin are diffusers' real tables (each frequency twice); the complex one holds each frequency once.
    """
    ids = torch.cat((txt_ids, img_ids), dim=0)
    key = (id(tr), ids.shape, ids.device, hash(ids.cpu().numpy().tobytes()))
    tables = _ROPE_CACHE.get(key)
    if tables is None:  # read once, return the local: another thread may clear the memo meanwhile
        if len(_ROPE_CACHE) > 16:
            _ROPE_CACHE.clear()
        cos, sin = tr.pos_embed(ids)
        tables = _ROPE_CACHE[key] = (cos, sin, torch.complex(cos[:, 0::2].float(), sin[:, 0::2].float()))
    return tables


def rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Flux RoPE of x (..., heads, head_dim) by complex freqs broadcastable to (..., 1, head_dim / 2).

    (a + ib)(cos + i sin) is diffusers' `x * cos + rotate(x) * sin` (use_real_unbind_dim=-1), computed in
    float32 like it, in one kernel instead of six.
    """
    xf = x.float()
    if not xf.is_contiguous():
        xf = xf.contiguous()
    out = torch.view_as_real(torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * freqs).flatten(-2)
    return out.to(x.dtype)


def _heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    return t.unflatten(-1, (-1, head_dim))


def _ln(norm, x):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def modulated(norm, x, shift, scale1):
    """AdaLN: layer_norm(x) * (1 + scale) + shift. When one row serves every token (one sequence packed) and
    the norm has no affine of its own (Flux's), (1 + scale, shift) are the layer norm's affine: one kernel."""
    width = x.shape[-1]
    if norm.weight is None and norm.bias is None and shift.numel() == width and scale1.numel() == width:
        return F.layer_norm(x, norm.normalized_shape, scale1.reshape(width), shift.reshape(width), norm.eps)
    return torch.addcmul(shift, _ln(norm, x), scale1)


def _rms(norm, x):
    return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)


#: CPU fp32 projections run from oneDNN's prepacked weights (`_linear_pointwise`), see `_fused_linear`
ONEDNN_LINEAR = True


@functools.lru_cache(maxsize=None)
def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _weight_kind(weight: torch.Tensor) -> str:
    """How `_fused_linear` keeps a weight: "onednn" (prepacked), "transposed" ((in, out) copy) or "module"."""
    if weight.device.type != "cpu":
        return "module"
    onednn = ONEDNN_LINEAR and weight.dtype == torch.float32 and _onednn_available()
    return "onednn" if onednn else "transposed"


def _matmul(x: torch.Tensor, weight: torch.Tensor, bias, kind: str, act: str = "none", approx: str = ""):
    """x @ W^T + b, then `act` ("none" or "gelu" with `approx`), with W as `_fused_linear` keeps it (`kind`)."""
    if kind == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, act, [], approx)
    if kind == "module":
        out = F.linear(x, weight, bias)
    else:  # "transposed": an (in, out) copy
        flat = x.reshape(-1, x.shape[-1])
        out = flat @ weight
        if bias is not None:
            # not addmm: on CPU it first copies the bias into every row of a fresh (cold) output, then the
            # product reads it back; here the product writes the output and the bias is added while in cache
            out += bias
        out = out.view(*x.shape[:-1], weight.shape[1])
    return out if act == "none" else torch.ops.aten.gelu_(out, approximate=approx)  # in place: `out` is ours


def _fused_linear(owner: torch.nn.Module, names: tuple[str, ...]):
    """Weights of linears that read the same input, concatenated so one matmul serves them all: (w, b, sizes,
    kind). With few masked tokens a step is dominated by per-call overhead, so 3-4 small matmuls become one.

    On CPU in fp32 the weight is prepacked for oneDNN (kind "onednn"): a plain GEMM repacks the whole weight
    on every call, which at ~100 rows (a small mask) costs as much as a good part of the product itself; the
    prepacked one runs the 100-row products 5-15 % faster and the 16 text rows up to 1.5x. Other CPU dtypes
    keep an (in, out) copy ("transposed": MKL runs `x @ W` from it faster than `x @ W^T` at few rows); on
    GPUs the module's layout is what cuBLAS wants ("module"), nothing is copied for a single linear
    (`names == ("",)`). Memoised on the module, rebuilt if a weight is replaced, moved or modified in place.
    """
    memo = owner.__dict__.get("_instgenie_weights")
    if memo is None:
        memo = owner.__dict__["_instgenie_weights"] = {}
    layers = memo.get(names)
    if layers is None:
        layers = memo[names] = [owner.get_submodule(n) for n in names]
    kind = _weight_kind(layers[0].weight)
    cached = memo.get((kind, names))
    # per call, so kept cheap: a plain tuple of each weight's and bias's identity and version
    stamp = tuple(v for l in layers for t in (l.weight, l.bias) if t is not None for v in (t.data_ptr(), t._version))
    if cached is None or cached[0] != stamp:
        if len(layers) == 1:
            weight, bias = layers[0].weight, layers[0].bias
        else:
            weight = torch.cat([l.weight for l in layers])
            bias = torch.cat([l.weight.new_zeros(l.weight.shape[0]) if l.bias is None else l.bias for l in layers])
        if kind == "onednn":
            weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
            bias = None if bias is None else bias.detach()
        elif kind == "transposed":
            weight = weight.t().contiguous()
        cached = memo[(kind, names)] = (stamp, weight, bias, [l.weight.shape[0] for l in layers], kind)
    return cached[1], cached[2], cached[3], cached[4]


def linear(layer, x):
    """layer(x) for an nn.Linear, from the prepacked or (in, out) weight on CPU (see _fused_linear)."""
    if x.device.type != "cpu":
        return F.linear(x, layer.weight, layer.bias)
    weight, bias, _, kind = _fused_linear(layer, ("",))
    return _matmul(x, weight, bias, kind)


def _project(owner, names, x):
    weight, bias, sizes, kind = _fused_linear(owner, names)
    return _matmul(x, weight, bias, kind).split(sizes, dim=-1)


def _project_whole(owner, names, x):
    """The fused projection's output, unsplit: (..., sum of the output sizes)."""
    weight, bias, _, kind = _fused_linear(owner, names)
    return _matmul(x, weight, bias, kind)


def _qk_weight(norm_q, norm_k):
    """Both RMSNorm weights stacked (2, 1, d) for a joint pass; None when the two norms differ otherwise."""
    if (norm_q.eps != norm_k.eps or norm_q.normalized_shape != norm_k.normalized_shape
            or (norm_q.weight is None) != (norm_k.weight is None)):
        return None
    if norm_q.weight is None:
        return ()
    stamp = (norm_q.weight.data_ptr(), norm_q.weight._version, norm_k.weight.data_ptr(), norm_k.weight._version)
    cached = norm_q.__dict__.get("_instgenie_qk")
    if cached is None or cached[0] != stamp or cached[1] is not norm_k:
        cached = (stamp, norm_k, torch.stack([norm_q.weight, norm_k.weight]).unsqueeze(1))
        norm_q.__dict__["_instgenie_qk"] = cached
    return cached[2]


def qk_rope(norm_q, norm_k, qk: torch.Tensor, freqs: torch.Tensor, head_dim: int):
    """Q and K from adjacent columns `qk` (..., 2 * hidden): RMS-normed and rotated in one pass for both.

    Same arithmetic as `rope(norm_q(q))` and `rope(norm_k(k))` (RMSNorm = normalise, then scale by the weight);
    freqs broadcastable to (..., 1, head_dim / 2). Returns (q, k), each (..., heads, head_dim).
    """
    # Joint only in fp32: in half precision the norm's own weight multiply is fused into its kernel (one
    # rounding), which the joint pass would split in two.
    weight = _qk_weight(norm_q, norm_k) if qk.dtype == torch.float32 else None
    if weight is None:
        q, k = qk.chunk(2, dim=-1)
        return rope(_rms(norm_q, _heads(q, head_dim)), freqs), rope(_rms(norm_k, _heads(k, head_dim)), freqs)
    x = qk.unflatten(-1, (2, -1, head_dim))  # (..., 2, heads, d)
    x = F.rms_norm(x, norm_q.normalized_shape, None, norm_q.eps)
    if len(weight):
        x = x * weight
    x = rope(x, freqs.unsqueeze(-3))
    return x.select(-3, 0), x.select(-3, 1)


def _ff_plan(ff):
    """(proj, approximate, out) when `ff` is diffusers' FeedForward(GELU) as Flux builds it, else None."""
    from diffusers.models.activations import GELU

    net = list(ff.net)
    if (len(net) in (3, 4) and type(net[0]) is GELU and isinstance(net[1], torch.nn.Dropout)
            and isinstance(net[2], torch.nn.Linear) and all(isinstance(m, torch.nn.Dropout) for m in net[3:])):
        return net[0].proj, net[0].approximate, net[2]
    return None


def _ff(ff, x):
    """FeedForward as two linears and a GELU (dropout is the identity at inference); any other shape: the module."""
    if "_instgenie_ff" not in ff.__dict__:
        ff.__dict__["_instgenie_ff"] = _ff_plan(ff)
    plan = ff.__dict__["_instgenie_ff"]
    if plan is None:
        return ff(x)
    proj, approximate, out = plan
    weight, bias, _, kind = _fused_linear(proj, ("",))
    # oneDNN applies the GELU as the GEMM's epilogue, on rows still in cache; other kinds in place after it
    return linear(out, _matmul(x, weight, bias, kind, "gelu", approximate))


class Packed:
    """Index bookkeeping of a packed batch of S sequences, built once per forward.

    Dual-stream blocks hold image rows (sequence after sequence) and text as (S, T, C). Single-stream blocks
    hold one row block per sequence, [text | its computed image tokens], so a sequence's rows are contiguous.
    """

    def __init__(self, token_index: list[torch.Tensor], n_txt: int, tables, caches, mode: str, device):
        self.token_index, self.n_txt, self.caches, self.mode = token_index, n_txt, caches, mode
        self.lengths = [int(t.numel()) for t in token_index]
        self.count = len(token_index)
        self.one = self.count == 1  # one sequence: per-sequence rows broadcast, no gathers at all
        self.stale: list[torch.Tensor | None] | None = None  # split KV attention: per-sequence stale-row masks
        self.cos, self.sin, freqs = tables
        positions = torch.cat(token_index) if token_index else torch.empty(0, dtype=torch.long, device=device)
        self.f_txt = freqs[:n_txt].unsqueeze(1)  # (T, 1, d/2)
        self.f_img_all = freqs[n_txt:].unsqueeze(1)  # (N, 1, d/2)
        self.f_img = self.f_img_all[positions]  # (n, 1, d/2)
        self.segments_len = [n_txt + m for m in self.lengths]
        text_pos = torch.arange(n_txt, device=device)
        self.f_tok = freqs[torch.cat([t for idx in token_index for t in (text_pos, idx + n_txt)])].unsqueeze(1)
        if not self.one:
            seq_ids = torch.arange(self.count, device=device)
            self.seq = torch.repeat_interleave(seq_ids, torch.tensor(self.lengths, device=device))
            self.tok_seq = torch.repeat_interleave(seq_ids, torch.tensor(self.segments_len, device=device))
            # rows of cat([text of every sequence, image rows of every sequence]) in per-sequence order
            perm, img_offset, self.txt_rows, self.img_rows, at = [], self.count * n_txt, [], [], 0
            for s, m in enumerate(self.lengths):
                perm += [torch.arange(s * n_txt, (s + 1) * n_txt), torch.arange(img_offset, img_offset + m)]
                self.txt_rows.append(torch.arange(at, at + n_txt))
                self.img_rows.append(torch.arange(at + n_txt, at + n_txt + m))
                img_offset, at = img_offset + m, at + n_txt + m
            self.join_perm = torch.cat(perm).to(device)
            self.txt_rows = torch.cat(self.txt_rows).to(device)
            self.img_rows = torch.cat(self.img_rows).to(device)

    # -- per-token views -----------------------------------------------------------------------------------
    def per_token(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-sequence rows (S, W) for the image rows of the dual stream."""
        return rows if self.one else rows[self.seq]

    def per_row(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-sequence rows (S, W) for the rows of the single stream."""
        return rows if self.one else rows[self.tok_seq]

    def split(self, t: torch.Tensor) -> list[torch.Tensor]:
        return list(t.split(self.lengths))

    def segments(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Single-stream rows of each sequence: views."""
        return [t] if self.one else list(t.split(self.segments_len))

    def join(self, txt: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        """(S, T, C) text + packed image rows -> single-stream rows."""
        rows = torch.cat([txt.flatten(0, 1), img])
        return rows if self.one else rows[self.join_perm]

    def text_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Single-stream rows -> (S, T, ...) text."""
        return rows[:self.n_txt].unsqueeze(0) if self.one else rows[self.txt_rows].unflatten(0, (self.count, self.n_txt))

    def image_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows[self.n_txt:] if self.one else rows[self.img_rows]

    def gather(self, full: torch.Tensor) -> torch.Tensor:
        """(S, N, C) every image token -> packed computed rows."""
        return torch.cat([full[s, idx] for s, idx in enumerate(self.token_index)])

    # -- attention -----------------------------------------------------------------------------------------
    def kv_attention(self, block: int, queries, keys, values) -> list[torch.Tensor]:
        """KV mode: per sequence, fresh rows [text | masked image tokens] (L, heads, d) against them + the cache."""
        t = self.n_txt
        if self.stale is not None:
            out = []
            for s, (q, k, v) in enumerate(zip(queries, keys, values)):
                k_cached, v_cached = self.caches[s].kv(block)
                out.append(split_attention(q, k, v, k_cached, v_cached, self.stale[s]))
            return out
        buf_k, buf_v = [], []
        for s, (k, v) in enumerate(zip(keys, values)):
            rows = self.token_index[s] + t
            for cached, fresh, dst in zip(self.caches[s].kv(block), (k, v), (buf_k, buf_v)):
                heads, n, d = cached.shape
                buf = torch.empty(heads, t + n, d, dtype=fresh.dtype, device=fresh.device)
                buf[:, :t] = fresh[:t].transpose(0, 1)
                buf[:, t:] = cached
                buf[:, rows] = fresh[t:].transpose(0, 1)
                dst.append(buf)
        return segment_attention(queries, buf_k, buf_v)

    def full_kv(self, attn, norm_full: torch.Tensor, txt_k: torch.Tensor, txt_v: torch.Tensor):
        """Y mode: [text K/V | K/V of every image token projected from the rebuilt full input], head-major."""
        d = attn.head_dim
        k, v = _project(attn, ("to_k", "to_v"), norm_full)
        k = rope(_rms(attn.norm_k, _heads(k, d)), self.f_img_all)
        keys = torch.cat([txt_k, k], dim=1).transpose(1, 2)
        values = torch.cat([txt_v, _heads(v, d)], dim=1).transpose(1, 2)
        return list(keys), list(values)


def dual_block(block, j: int, h_img, txt, mod, pack: Packed, full_in):
    attn = block.attn
    d = attn.head_dim
    e_img, e_txt = mod.dual(j)
    shift1, scale1, gate1, shift2, scale2, gate2 = pack.per_token(e_img).chunk(6, dim=1)
    c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = e_txt.unsqueeze(1).chunk(6, dim=2)
    x = modulated(block.norm1.norm, h_img, shift1, scale1)
    xt = modulated(block.norm1_context.norm, txt, c_shift1, c_scale1)

    hidden = x.shape[-1]
    if pack.mode == "kv":
        qkv = _project_whole(attn, ("to_q", "to_k", "to_v"), x)
        q, k = qk_rope(attn.norm_q, attn.norm_k, qkv[:, :2 * hidden], pack.f_img, d)
        v = _heads(qkv[:, 2 * hidden:], d)
    else:
        q = rope(_rms(attn.norm_q, _heads(linear(attn.to_q, x), d)), pack.f_img)
    tqkv = _project_whole(attn, ("add_q_proj", "add_k_proj", "add_v_proj"), xt)
    tq, tk = qk_rope(attn.norm_added_q, attn.norm_added_k, tqkv[..., :2 * hidden], pack.f_txt, d)
    tv = _heads(tqkv[..., 2 * hidden:], d)

    queries = [torch.cat([tq[s], qs]) for s, qs in enumerate(pack.split(q))]
    if pack.mode == "kv":
        keys = [torch.cat([tk[s], ks]) for s, ks in enumerate(pack.split(k))]
        values = [torch.cat([tv[s], vs]) for s, vs in enumerate(pack.split(v))]
        out = pack.kv_attention(j, queries, keys, values)
    else:
        f_shift, f_scale = e_img.unsqueeze(1).chunk(6, dim=2)[:2]
        norm_full = modulated(block.norm1.norm, full_in, f_shift, f_scale)
        out = segment_attention(queries, *pack.full_kv(attn, norm_full, tk, tv))

    t = pack.n_txt
    if pack.one:
        txt_attn, img_attn = out[0][:t].unsqueeze(0), out[0][t:]
    else:
        txt_attn, img_attn = torch.stack([o[:t] for o in out]), torch.cat([o[t:] for o in out])
    h_img = torch.addcmul(h_img, gate1, linear(attn.to_out[0], img_attn.to(q.dtype)))
    h_img = torch.addcmul(h_img, gate2, _ff(block.ff, modulated(block.norm2, h_img, shift2, scale2)))
    txt = torch.addcmul(txt, c_gate1, linear(attn.to_add_out, txt_attn.to(q.dtype)))
    txt = torch.addcmul(txt, c_gate2, _ff(block.ff_context, modulated(block.norm2_context, txt, c_shift2, c_scale2)))
    if txt.dtype == torch.float16:
        txt = txt.clip(-65504, 65504)
    return h_img, txt


def single_block(block, b: int, rows, e, pack: Packed, full_in):
    """One single-stream block on the packed [text | image] rows of every sequence.

    oneDNN weights: Q/K/V in one GEMM, the MLP in another with its GELU as the epilogue (aten's GELU is a slow
    pass of its own), and proj_out reads their concatenation [attention | mlp], as diffusers builds it. Other
    kinds: the fused projection's output [q | k | v | mlp] doubles as proj_out's input: once attention has
    read v, its output goes into v's columns and the MLP activation is applied in place (no concatenation).
    """
    attn = block.attn
    d = attn.head_dim
    hidden = rows.shape[-1]
    shift, scale1, gate = pack.per_row(e).chunk(3, dim=1)
    x = modulated(block.norm.norm, rows, shift, scale1)
    gelu = isinstance(block.act_mlp, torch.nn.GELU)
    split_mlp = gelu and _weight_kind(block.proj_mlp.weight) == "onednn"
    names = ("attn.to_q", "attn.to_k", "attn.to_v") + (() if split_mlp else ("proj_mlp",))
    proj = _project_whole(block, names, x)
    v = _heads(proj[:, 2 * hidden:3 * hidden], d)
    if pack.mode == "kv":
        q, k = qk_rope(attn.norm_q, attn.norm_k, proj[:, :2 * hidden], pack.f_tok, d)
        out = pack.kv_attention(b, pack.segments(q), pack.segments(k), pack.segments(v))
    else:
        q = rope(_rms(attn.norm_q, _heads(proj[:, :hidden], d)), pack.f_tok)
        # Text rows keep their fresh K/V; the image rows' K/V come from the rebuilt full input.
        k_txt = rope(_rms(attn.norm_k, _heads(pack.text_rows(proj[:, hidden:2 * hidden]), d)), pack.f_txt)
        f_shift, f_scale = e.unsqueeze(1).chunk(3, dim=2)[:2]
        norm_full = modulated(block.norm.norm, full_in, f_shift, f_scale)
        out = segment_attention(pack.segments(q), *pack.full_kv(attn, norm_full, k_txt, pack.text_rows(v)))
    attn_out = out[0] if pack.one else torch.cat(out)
    if split_mlp:
        weight, bias, _, kind = _fused_linear(block.proj_mlp, ("",))
        tail = torch.cat([attn_out, _matmul(x, weight, bias, kind, "gelu", block.act_mlp.approximate)], dim=1)
    else:
        tail = proj[:, 2 * hidden:]  # v's columns, then the MLP's
        tail[:, :hidden] = attn_out  # v has been read by now
        mlp = tail[:, hidden:]
        if gelu:
            torch.ops.aten.gelu_(mlp, approximate=block.act_mlp.approximate)
        else:
            mlp.copy_(block.act_mlp(mlp))
    rows = torch.addcmul(rows, gate, linear(block.proj_out, tail))
    if rows.dtype == torch.float16:
        rows = rows.clip(-65504, 65504)
    return rows


def block_full(block, full_in, txt, temb, pack: Packed):
    """Y mode, block chosen for full compute: the stock block on every image token. Returns (txt, full output)."""
    txt, full_out = block(hidden_states=full_in, encoder_hidden_states=txt, temb=temb,
                          image_rotary_emb=(pack.cos, pack.sin))
    return txt, full_out
