"""Analytical FLOPs of one Flux transformer call: stock (every token) and mask-aware (KV / Y mode).

Counts matrix multiplies only (2 * m * n * k), which dominate: projections, MLPs and attention (QK^T and
AV). Used for the FLOP-ideal speedup in benchmarks and as the regressor of the cost model.
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


def step_flops(shape: FluxShape, image_tokens: int, text_tokens: int, computed: int | None = None,
               mode: str = "stock") -> float:
    """FLOPs of one sequence through the transformer.

    computed: image tokens that flow through the blocks (the masked ones); None = all (stock).
    mode: "stock" | "kv" | "y".
    """
    h, n, t = shape.hidden, image_tokens, text_tokens
    m = n if computed is None or mode == "stock" else computed
    mlp = 2 * shape.mlp_ratio * h * h  # h -> r*h -> h, in multiply-adds
    qkvo = 4 * h * h
    # Y mode also projects K and V of every unmasked image token from its rebuilt full input.
    kv_extra = 2 * h * h * (n - m) if mode == "y" else 0
    attention = 2 * (m + t) * (n + t) * h  # QK^T and AV, multiply-adds
    dual = (m + t) * (qkvo + mlp) + kv_extra + attention
    single_linear = 3 * h * h + shape.mlp_ratio * h * h + (1 + shape.mlp_ratio) * h * h
    single = (m + t) * single_linear + kv_extra + attention
    embed = m * (shape.in_channels * h + h * shape.out_channels) + t * h * h
    return 2.0 * (shape.dual_blocks * dual + shape.single_blocks * single + embed)


def ideal_speedup(shape: FluxShape, image_tokens: int, text_tokens: int, computed: int, mode: str) -> float:
    return step_flops(shape, image_tokens, text_tokens) / step_flops(shape, image_tokens, text_tokens, computed, mode)
