"""How long a worker takes: a denoising step of a batch, and bringing a template's cache closer to its device.

compute(step)  = a * FLOPs(batch) + d * X(batch) + c * n + b
                                                  FLOPs from engine/flops.py over every sequence of the batch,
                                                  counted as the profiled engine attends in KV mode; X its
                                                  split-attention passes over cached keys; n requests in it
store -> host  = bytes / bandwidth + objects * c  a template's cache is one object per step
host -> device = bytes / bandwidth + c            per step, the batch's step shards; overlapped with compute
                                                  by the bubble-free pipeline, so a step takes max(both)

`FittedCostModel` takes its constants from a device profile (`instgenie profile`, see profile.py);
`AnalyticalCostModel` from configured throughput, per-step overhead and store bandwidth (no profile).
Workers describe their model with the fields of worker.v1.ModelInfo, which is all the FLOP count needs.

`CostModel.request_flops` is the one per-request figure the scheduler, the placement timeline and the simulator
sum over a batch and feed to `step_time`. It counts the request's own template: `image_tokens` (the template's
size; 0 = the model's default) sizes the attention, the cached-key passes and, for a UNet, every convolution.
A UNet model (family "unet-inpaint", with its announced shape) is counted by `unet_step_flops` with O-caching;
the scheduler knows only its masked latent cells, so each level's masked tokens are estimated for a compact
mask (flops.compact_mask_tokens). A fitted model with a d term folds it in as FLOPs at the dense rate,
FLOPs + (d / a) * X, so every step stays a * sum + c * n + b (the linear fast path of placement).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, replace
from functools import lru_cache

from instgenie.engine.flops import FluxShape, UNetShape, cached_attention_flops, step_flops, unet_step_flops

from .profile import Profile


UNET = "unet-inpaint"


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of a served model (a subset of worker.v1.ModelInfo)."""

    model_id: str
    image_tokens: int
    text_tokens: int
    hidden: int
    dual_blocks: int
    single_blocks: int
    in_channels: int
    out_channels: int
    branches: int = 1
    family: str = "flux"
    #: a UNet's shape (family "unet-inpaint"); None for a transformer, or a UNet the count does not model
    unet: UNetShape | None = None

    def __post_init__(self):  # a profile's details carry the UNet shape as a dict
        if isinstance(self.unet, dict):
            object.__setattr__(self, "unet", UNetShape(**self.unet))

    @classmethod
    def from_proto(cls, info) -> "ModelShape":
        unet = None
        if info.HasField("unet"):
            u = info.unet
            unet = UNetShape(tuple(u.channels), tuple(u.layers), tuple(u.down_attention), tuple(u.up_attention),
                             tuple(u.transformer_layers), u.mid_attention, u.cross_attention_dim, info.in_channels,
                             info.out_channels or info.in_channels, u.time_embed_dim)
        return cls(info.model_id, info.image_tokens, info.text_tokens, info.hidden, info.dual_blocks,
                   info.single_blocks, info.in_channels, info.out_channels or info.in_channels, max(1, info.branches),
                   info.family or "flux", unet)

    @property
    def flux(self) -> FluxShape:
        return FluxShape(self.dual_blocks, self.single_blocks, self.hidden, self.in_channels, self.out_channels)

    @property
    def is_unet(self) -> bool:
        return self.family == UNET


def _image_tokens(shape: ModelShape, image_tokens: int) -> int:
    return int(image_tokens) if image_tokens and image_tokens > 0 else shape.image_tokens


def _computed(image_tokens: int, tokens: int) -> int:
    return max(1, min(int(tokens), image_tokens or int(tokens)))


@lru_cache(maxsize=65536)
def request_flops(shape: ModelShape, tokens: int, mode: str = "kv", kv_attention: str = "joint",
                  cached_weight: float = 0.0, image_tokens: int = 0) -> float:
    """FLOPs of one request's denoising step computing `tokens` masked tokens of a template of `image_tokens`
    tokens (0: the model's default size), every guidance branch included, KV attention counted as
    `kv_attention`; plus `cached_weight` x its cached-key attention FLOPs (a fitted profile's d / a: that pass's
    surcharge expressed in FLOPs at the dense rate). A UNet counts O-caching whatever `mode` says (its only
    mode) and has no cached-key pass."""
    n = _image_tokens(shape, image_tokens)
    computed = _computed(n, tokens)
    if shape.is_unet:
        # A UNet worker of a shape the count does not model announces none: its steps cost only b and c.
        flops = 0.0 if shape.unet is None else unet_step_flops(shape.unet, n, shape.text_tokens, computed)
        return flops * shape.branches
    mode = mode if mode in ("kv", "y") else "kv"
    flops = step_flops(shape.flux, n, shape.text_tokens, computed=computed, mode=mode, kv_attention=kv_attention)
    if cached_weight and mode == "kv":
        flops += cached_weight * cached_attention_flops(shape.flux, n, shape.text_tokens, computed, kv_attention)
    return flops * shape.branches


def request_cached_flops(shape: ModelShape, tokens: int, mode: str = "kv", kv_attention: str = "joint",
                         image_tokens: int = 0) -> float:
    """FLOPs of one request's split KV attention passes over cached keys (the d term's regressor), every branch."""
    if mode != "kv" or shape.is_unet:
        return 0.0
    n = _image_tokens(shape, image_tokens)
    return cached_attention_flops(shape.flux, n, shape.text_tokens, _computed(n, tokens), kv_attention) \
        * shape.branches


class CostModel(abc.ABC):
    """Seconds of a step from the batch's FLOPs; seconds of cache transfers from their bytes."""

    name = "abstract"
    #: per request, outside the denoising loop: pre-processing before it can join a batch, decode after
    pre_seconds = 0.0
    post_seconds = 0.0

    @abc.abstractmethod
    def step_time(self, flops: float, requests: int = 1, device_bytes: int = 0) -> float:
        """One denoising step of a batch of `requests` requests, `flops` FLOPs, step shards of `device_bytes`."""

    @abc.abstractmethod
    def transfer_seconds(self, cache_bytes: int, objects: int = 1) -> float:
        """Object store -> host memory for `cache_bytes` in `objects` objects."""

    @property
    def streams_to_device(self) -> bool:
        """True when step shards move host -> device every step (a GPU worker); False when read in place."""
        return False

    @property
    def linear(self) -> tuple[float, float, float] | None:
        """(a, b, c) when a step is exactly a * flops + c * requests + b whatever its bytes (the fast path of
        predict_finish); None otherwise."""
        return None

    def request_flops(self, shape: ModelShape, tokens: int, mode: str = "kv", image_tokens: int = 0) -> float:
        """Module `request_flops` as this model counts them (a fitted profile: its KV attention and d term)."""
        return request_flops(shape, tokens, mode, image_tokens=image_tokens)

    def step_seconds(self, shape: ModelShape, masked_tokens: list[int], mode: str = "kv",
                     image_tokens: list[int] | None = None) -> float:
        """One denoising step of a batch whose requests compute these masked tokens (per guidance branch) of
        templates of these sizes (None: every one the model's default)."""
        sizes = image_tokens or [0] * len(masked_tokens)
        return self.step_time(sum(self.request_flops(shape, t, mode, n) for t, n in zip(masked_tokens, sizes)),
                              len(masked_tokens))


@dataclass
class AnalyticalCostModel(CostModel):
    #: effective FLOP/s of a worker's transformer (a in the fit is 1 / this)
    flops_per_second: float = 2.0e11
    #: fixed cost of a step: launches, scheduling, per-request bookkeeping
    step_overhead_seconds: float = 0.005
    #: object store -> worker host memory
    store_bandwidth_bytes_per_second: float = 500e6
    store_latency_seconds: float = 0.02

    name = "analytical"

    def step_time(self, flops: float, requests: int = 1, device_bytes: int = 0) -> float:
        return flops / self.flops_per_second + self.step_overhead_seconds

    @property
    def linear(self) -> tuple[float, float, float]:
        return 1.0 / self.flops_per_second, self.step_overhead_seconds, 0.0

    def transfer_seconds(self, cache_bytes: int, objects: int = 1) -> float:
        if cache_bytes <= 0:
            return 0.0
        # One latency per template as before: the analytical model has no per-object figure.
        return cache_bytes / self.store_bandwidth_bytes_per_second + self.store_latency_seconds


class FittedCostModel(CostModel):
    """The constants of a device profile; `speed` scales compute (a device slower than profiled: > 1)."""

    def __init__(self, profile: Profile):
        self.profile = profile
        self.name = profile.profile_id
        self.a, self.b, self.c = profile.compute_a, profile.compute_b, profile.compute_c
        self.d, self.kv_attention = profile.compute_d, profile.kv_attention
        # d folded into FLOP-equivalents; a profile whose a was pinned to 0 cannot express it that way (never
        # seen: a step's time grows with its FLOPs), so there d is dropped rather than divided by zero
        self.cached_weight = self.d / self.a if self.a > 0 else 0.0
        self.store = profile.store_to_host
        self.device = profile.host_to_device
        self.pre_seconds, self.post_seconds = profile.pre_seconds, profile.post_seconds

    def step_time(self, flops: float, requests: int = 1, device_bytes: int = 0) -> float:
        compute = self.a * flops + self.c * requests + self.b
        if self.device is None or device_bytes <= 0:
            return compute
        return max(compute, self.device.seconds(device_bytes))

    @property
    def streams_to_device(self) -> bool:
        return self.device is not None

    @property
    def linear(self) -> tuple[float, float, float] | None:
        return None if self.device is not None else (self.a, self.b, self.c)

    def request_flops(self, shape: ModelShape, tokens: int, mode: str = "kv", image_tokens: int = 0) -> float:
        return request_flops(shape, tokens, mode, self.kv_attention, self.cached_weight, image_tokens)

    def transfer_seconds(self, cache_bytes: int, objects: int = 1) -> float:
        return self.store.seconds(cache_bytes, objects)


def cap_store_reads(cost: CostModel, bytes_per_second: float) -> CostModel:
    """`cost` for a worker that caps its object-store reads (`--store-read-mbps`): cold templates load at the
    lower of the cap and the profiled bandwidth; everything else unchanged. `cost` itself when the cap is
    none or above the profiled bandwidth."""
    if not bytes_per_second or bytes_per_second <= 0:
        return cost
    if isinstance(cost, FittedCostModel):
        store = cost.store
        if bytes_per_second >= store.bandwidth:
            return cost
        capped = replace(store, bandwidth=bytes_per_second,
                         source=f"{store.source}; capped by the worker at {bytes_per_second / 1e6:g} MB/s")
        out = FittedCostModel(replace(cost.profile, store_to_host=capped))
        out.name = f"{cost.name} (store reads <= {bytes_per_second / 1e6:g} MB/s)"
        return out
    if isinstance(cost, AnalyticalCostModel):
        if bytes_per_second >= cost.store_bandwidth_bytes_per_second:
            return cost
        return replace(cost, store_bandwidth_bytes_per_second=bytes_per_second)
    return cost

