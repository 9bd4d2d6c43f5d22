"""Analytical FLOPs of one Flux transformer call: stock (every token) and mask-aware (KV / Y mode).

Counts matrix multiplies only (2 * m * n * k), which dominate: projections, MLPs and attention (QK^T and
AV). Used for the FLOP-ideal speedup in benchmarks and as the regressor of the cost model.

KV-mode attention has two implementations (engine/transformer/attention.py) that do different work:
"joint" builds one key buffer [text | cached image rows with the masked ones fresh] and attends (m + t) queries
to its n + t keys; "split" (CPU) attends to the cached rows in place -- all n of them, the stale masked rows
masked out but still computed -- and separately to the m + t fresh rows, so (m + t) x (n + m + t) in all, and
only the fresh pass at a full mask. The benchmarks' FLOP ideal uses "joint"; the cost model counts what the
worker's engine runs, and `cached_attention_flops` is the split path's masked pass, which a profile may charge
at its own rate.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FluxShape:
    dual_blocks: int
    single_blocks: int
    hidden: int
    in_channels: int
    out_channels: int
    mlp_ratio: float = 4.0

    @classmethod
    def of(cls, transformer) -> "FluxShape":
        c = transformer.config
        return cls(len(transformer.transformer_blocks), len(transformer.single_transformer_blocks),
                   transformer.inner_dim, c.in_channels, c.out_channels or c.in_channels)


KV_ATTENTION = ("joint", "split")


def step_flops(shape: FluxShape, image_tokens: int, text_tokens: int, computed: int | None = None,
               mode: str = "stock", kv_attention: str = "joint") -> float:
    """FLOPs of one sequence through the transformer.

    computed: image tokens that flow through the blocks (the masked ones); None = all (stock).
    mode: "stock" | "kv" | "y". kv_attention: "joint" | "split", how KV mode attends (see the module docstring).
    """
    if kv_attention not in KV_ATTENTION:
        raise ValueError(f"unknown kv_attention {kv_attention!r}; expected one of {KV_ATTENTION}")
    h, n, t = shape.hidden, image_tokens, text_tokens
    m = n if computed is None or mode == "stock" else computed
    mlp = 2 * shape.mlp_ratio * h * h  # h -> r*h -> h, in multiply-adds
    qkvo = 4 * h * h
    # Y mode also projects K and V of every unmasked image token from its rebuilt full input.
    kv_extra = 2 * h * h * (n - m) if mode == "y" else 0
    attention = 2 * (m + t) * (n + t) * h  # QK^T and AV, multiply-adds
    if mode == "kv" and kv_attention == "split" and m < n:
        attention = 2 * (m + t) * (m + t) * h + _cached_pass(m, n, t, h)
    dual = (m + t) * (qkvo + mlp) + kv_extra + attention
    single_linear = 3 * h * h + shape.mlp_ratio * h * h + (1 + shape.mlp_ratio) * h * h
    single = (m + t) * single_linear + kv_extra + attention
    embed = m * (shape.in_channels * h + h * shape.out_channels) + t * h * h
    return 2.0 * (shape.dual_blocks * dual + shape.single_blocks * single + embed)


def _cached_pass(m: int, n: int, t: int, h: int) -> int:
    """Split KV attention's pass over the cached image rows, multiply-adds: every one of the n rows, the m stale
    ones masked out after being computed."""
    return 2 * (m + t) * n * h


def cached_attention_flops(shape: FluxShape, image_tokens: int, text_tokens: int, computed: int,
                           kv_attention: str = "split") -> float:
    """FLOPs of one sequence's split-attention passes over the cached keys (every block), a part of
    `step_flops(..., mode="kv", kv_attention="split")`; 0 for the joint buffer and at a full mask (no pass)."""
    n, m = image_tokens, max(0, min(int(computed), image_tokens))
    if kv_attention != "split" or m >= n:
        return 0.0
    return 2.0 * (shape.dual_blocks + shape.single_blocks) * _cached_pass(m, n, text_tokens, shape.hidden)


def ideal_speedup(shape: FluxShape, image_tokens: int, text_tokens: int, computed: int, mode: str) -> float:
    return step_flops(shape, image_tokens, text_tokens) / step_flops(shape, image_tokens, text_tokens, computed, mode)
