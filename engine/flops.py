"""Analytical FLOPs of one denoiser call: a Flux transformer (stock, KV / Y mode) and a UNet (stock, O-caching).

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

import math
from collections.abc import Sequence
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


# ----------------------------------------------------------------------------------------------------- UNet
#: the diffusers blocks whose work the UNet count knows (SD 1.x / 2.x inpainting UNets are built from them)
_UNET_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UNET_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_UNET_MID = {"UNetMidBlock2DCrossAttn": True, None: False}
#: config values other than these change what the UNet computes in ways the count does not model
_UNET_PLAIN = {"class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim_type": None,
               "time_cond_proj_dim": None, "time_embedding_type": "positional", "resnet_time_scale_shift": "default",
               "conv_in_kernel": 3, "conv_out_kernel": 3, "only_cross_attention": False, "dual_cross_attention": False,
               "attention_type": "default", "reverse_transformer_layers_per_block": None}


@dataclass(frozen=True)
class UNetShape:
    """What the FLOPs of a diffusers UNet2DConditionModel step depend on; per level where it varies (level 0 is
    the latent grid, each next one halves it; the up block of a level has one ResNet more than its down block)."""

    channels: tuple[int, ...]
    layers: tuple[int, ...]
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]
    transformer_layers: tuple[int, ...]
    mid_attention: bool
    cross_attention_dim: int
    in_channels: int
    out_channels: int
    time_embed_dim: int

    def __post_init__(self):  # JSON (a profile's details) gives lists: tuples keep the shape hashable
        for name in ("channels", "layers", "down_attention", "up_attention", "transformer_layers"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def levels(self) -> int:
        return len(self.channels)

    def block_levels(self) -> list[int]:
        """The level of every BasicTransformerBlock (one self-attention each) in the cache's numbering
        (unet.ocache.block_levels: module registration order, down path, up path, mid)."""
        top = self.levels - 1
        down = [lv for lv in range(self.levels) if self.down_attention[lv]
                for _ in range(self.layers[lv] * self.transformer_layers[lv])]
        mid = [top] * self.transformer_layers[top] if self.mid_attention else []
        up = [lv for lv in reversed(range(self.levels)) if self.up_attention[lv]
              for _ in range((self.layers[lv] + 1) * self.transformer_layers[lv])]
        return down + up + mid

    def o_cache_elements(self, image_tokens: int) -> int:
        """Elements of one step's O-cache for one guidance branch: every block's self-attention output, its
        level's tokens x channels (unet.ocache.o_cache_bytes counts the same from the modules)."""
        n = unet_level_tokens(image_tokens, self.levels)
        return sum(n[lv] * self.channels[lv] for lv in self.block_levels())

    @classmethod
    def of(cls, unet) -> "UNetShape":
        """From the UNet's config; ValueError for a UNet built from blocks or options the count does not know."""
        c = unet.config
        levels = len(c.block_out_channels)
        odd = {k: c.get(k) for k, v in _UNET_PLAIN.items() if c.get(k, v) != v}
        if odd:
            raise ValueError(f"the UNet FLOP count does not model {odd}")
        down, up = list(c.down_block_types), list(c.up_block_types)
        unknown = [t for t in down if t not in _UNET_DOWN] + [t for t in up if t not in _UNET_UP] + \
            ([c.mid_block_type] if c.mid_block_type not in _UNET_MID else [])
        if unknown:
            raise ValueError(f"the UNet FLOP count does not know blocks {unknown}")

        def per_level(value, name):
            out = [value] * levels if isinstance(value, int) else list(value)
            if len(out) != levels or not all(isinstance(v, int) for v in out):
                raise ValueError(f"the UNet FLOP count needs one int {name} per level, got {value!r}")
            return tuple(out)

        heads = per_level(c.num_attention_heads or c.attention_head_dim, "attention head count")
        if any(ch % h for ch, h in zip(c.block_out_channels, heads)):
            raise ValueError("the UNet FLOP count needs each level's channels divisible by its head count")
        return cls(tuple(int(x) for x in c.block_out_channels), per_level(c.layers_per_block, "layers_per_block"),
                   tuple(_UNET_DOWN[t] for t in down), tuple(_UNET_UP[t] for t in reversed(up)),
                   per_level(c.transformer_layers_per_block, "transformer_layers_per_block"),
                   _UNET_MID[c.mid_block_type], int(c.cross_attention_dim), int(c.in_channels), int(c.out_channels),
                   int(c.time_embedding_dim or 4 * c.block_out_channels[0]))


def unet_level_tokens(image_tokens: int, levels: int) -> list[int]:
    """Tokens of each level: a template's latent grid has sides divisible by 2^(levels - 1) (its token cell)."""
    return [int(image_tokens) >> (2 * lv) for lv in range(levels)]


def compact_mask_tokens(image_tokens: int, computed: int, levels: int) -> list[int]:
    """Masked tokens per level of a compact mask (a brush stroke) of `computed` latent cells, when only that
    count is known (the scheduler). The engine max-pools the mask by 2 per level (unet.ocache.level_masks); a
    box of side s cells at a random offset covers s / 2^l + 1 - 2^-l cells of level l per side on average. A
    scattered mask covers more of the coarse levels than this says."""
    sizes = unet_level_tokens(image_tokens, levels)
    computed = max(0, min(int(computed), sizes[0]))
    if computed == 0:
        return [0] * levels
    side = math.sqrt(computed)
    return [computed] + [min(sizes[lv], max(1, round((side / 2 ** lv + 1 - 2 ** -lv) ** 2)))
                         for lv in range(1, levels)]


def unet_step_flops(shape: UNetShape, image_tokens: int, text_tokens: int,
                    computed: int | Sequence[int] | None = None) -> float:
    """FLOPs of one sequence through the UNet: stock (computed None), or O-caching with `computed` masked
    tokens, per level (as the engine's level masks count them) or as latent cells (a compact mask assumed).

    Counts what runs (multiply-adds x 2, as FlopCounterMode): every convolution (3x3 at every output position,
    the 1x1 shortcuts), the time embedding and each ResNet's time projection, and each BasicTransformerBlock's
    projections, attention (QK^T and AV) and GEGLU feed-forward. O-caching (unet/ocache.py) changes only the
    self-attention: Q, the attention and the out-projection for the masked tokens of the block's level; K/V
    for all of them.
    """
    n = unet_level_tokens(image_tokens, shape.levels)
    if computed is None:
        m = n
    elif isinstance(computed, int):
        m = compact_mask_tokens(image_tokens, computed, shape.levels)
    else:
        m = [max(0, min(int(c), size)) for c, size in zip(computed, n)]
        if len(m) != shape.levels:
            raise ValueError(f"computed has {len(computed)} levels; the UNet has {shape.levels}")
    t, x, e, ch = text_tokens, shape.cross_attention_dim, shape.time_embed_dim, shape.channels

    def resnet(cin: int, cout: int, lv: int) -> int:
        shortcut = n[lv] * cin * cout if cin != cout else 0
        return n[lv] * 9 * cin * cout + e * cout + n[lv] * 9 * cout * cout + shortcut

    def transformer(c: int, lv: int, depth: int) -> int:
        q, k = m[lv], n[lv]  # self-attention queries, keys
        block = (2 * q * c * c + 2 * k * c * c + 2 * q * k * c  # attn1: Q and out for queries, K/V for all
                 + 2 * k * c * c + 2 * t * x * c + 2 * k * t * c  # attn2: Q, out; K/V of the text; attention
                 + 12 * k * c * c)  # GEGLU feed-forward: c -> 2 x 4c, 4c -> c
        return 2 * k * c * c + depth * block  # proj_in and proj_out around the blocks

    levels = shape.levels
    macs = ch[0] * e + e * e + n[0] * 9 * shape.in_channels * ch[0]  # time embedding, conv_in
    cin = ch[0]
    for lv in range(levels):  # down
        for j in range(shape.layers[lv]):
            macs += resnet(cin if j == 0 else ch[lv], ch[lv], lv)
            if shape.down_attention[lv]:
                macs += transformer(ch[lv], lv, shape.transformer_layers[lv])
        if lv < levels - 1:  # stride-2 conv, output at the next level
            macs += n[lv + 1] * 9 * ch[lv] * ch[lv]
        cin = ch[lv]
    top = levels - 1
    macs += 2 * resnet(ch[top], ch[top], top)  # mid
    if shape.mid_attention:
        macs += transformer(ch[top], top, shape.transformer_layers[top])
    prev = ch[top]
    for lv in reversed(range(levels)):  # up: each ResNet also takes a skip connection of the down path
        layers = shape.layers[lv] + 1
        for j in range(layers):
            skip = ch[max(lv - 1, 0)] if j == layers - 1 else ch[lv]
            macs += resnet((prev if j == 0 else ch[lv]) + skip, ch[lv], lv)
            if shape.up_attention[lv]:
                macs += transformer(ch[lv], lv, shape.transformer_layers[lv])
        if lv > 0:  # nearest upsampling, then a 3x3 conv at the finer level
            macs += n[lv - 1] * 9 * ch[lv] * ch[lv]
        prev = ch[lv]
    macs += n[0] * 9 * ch[0] * shape.out_channels  # conv_out
    return 2.0 * macs
