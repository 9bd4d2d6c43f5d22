"""Small tensor ops shared by the forward passes: RoPE on packed tokens and per-segment attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Flux RoPE on packed tokens: x (n, heads, head_dim), cos/sin (n, head_dim).

    Same arithmetic as diffusers' `apply_rotary_emb(..., use_real_unbind_dim=-1)`, so results are bitwise equal.
    """
    x_real, x_imag = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(-2)
    return (x.float() * cos[:, None, :] + x_rotated.float() * sin[:, None, :]).to(x.dtype)


def _varlen_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def segment_attention(
    q: list[torch.Tensor], k: list[torch.Tensor], v: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Attention of each segment's queries over that segment's keys/values only.

    Each list item is one sequence: q (Lq, heads, d), k/v (heads, Lk, d) -- keys/values are kept head-major so
    the large cached buffers go to the kernel without another copy. Returns (Lq, heads*d) per segment.
    On CUDA one varlen kernel serves the whole packed batch; elsewhere a loop of SDPA calls, which is exact
    and on CPU costs little next to the matmuls.
    """
    if q and _varlen_available(q[0].device) and q[0].dtype in (torch.float16, torch.bfloat16):
        return _varlen_attention(q, k, v)
    out = []
    for qs, ks, vs in zip(q, k, v):
        o = F.scaled_dot_product_attention(qs.transpose(0, 1).unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0))
        out.append(o[0].transpose(0, 1).flatten(1))
    return out


def _varlen_attention(q, k, v):  # pragma: no cover - needs a GPU
    from torch.nn.attention.varlen import varlen_attn

    lq = torch.tensor([0] + [t.shape[0] for t in q], device=q[0].device).cumsum(0, dtype=torch.int32)
    lk = torch.tensor([0] + [t.shape[1] for t in k], device=q[0].device).cumsum(0, dtype=torch.int32)
    out = varlen_attn(
        torch.cat(q), torch.cat([t.transpose(0, 1) for t in k]), torch.cat([t.transpose(0, 1) for t in v]), lq, lk,
        max(t.shape[0] for t in q), max(t.shape[1] for t in k),
    )
    return [o.flatten(1) for o in out.split([t.shape[0] for t in q])]
