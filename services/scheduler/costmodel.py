"""How long a worker takes: a denoising step of a batch, and bringing a template's cache into host memory.

compute(step) = a * FLOPs(batch) + b            FLOPs from engine/flops.py over every sequence of the batch
transfer      = bytes / bandwidth + latency     object store -> worker host memory

`AnalyticalCostModel` takes a and b from a configured throughput and per-step overhead; `instgenie profile`
(a later issue) fits them on the device and plugs in through the same interface. Workers describe their model
with the fields of worker.v1.ModelInfo, which is all the model needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from instgenie.engine.flops import FluxShape, step_flops


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

    @classmethod
    def from_proto(cls, info) -> "ModelShape":
        return cls(info.model_id, info.image_tokens, info.text_tokens, info.hidden, info.dual_blocks,
                   info.single_blocks, info.in_channels, info.out_channels or info.in_channels, max(1, info.branches))

    @property
    def flux(self) -> FluxShape:
        return FluxShape(self.dual_blocks, self.single_blocks, self.hidden, self.in_channels, self.out_channels)


class CostModel(Protocol):
    def step_seconds(self, shape: ModelShape, masked_tokens: list[int]) -> float:
        """One denoising step of a batch whose requests compute these masked tokens (per guidance branch)."""
        ...

    def transfer_seconds(self, cache_bytes: int) -> float:
        """Object store -> host memory for a whole template cache."""
        ...


@dataclass
class AnalyticalCostModel:
    #: effective FLOP/s of a worker's transformer (a in the fit is 1 / this)
    flops_per_second: float = 2.0e11
    #: fixed cost of a step: launches, scheduling, per-request bookkeeping
    step_overhead_seconds: float = 0.005
    #: object store -> worker host memory
    store_bandwidth_bytes_per_second: float = 500e6
    store_latency_seconds: float = 0.02

    def __post_init__(self):
        self._flops_memo: dict[tuple, float] = {}

    def _flops(self, shape: ModelShape, tokens: int) -> float:
        key = (shape, tokens)
        value = self._flops_memo.get(key)
        if value is None:
            value = step_flops(shape.flux, shape.image_tokens, shape.text_tokens, computed=tokens, mode="kv")
            if len(self._flops_memo) > 65536:
                self._flops_memo.clear()
            self._flops_memo[key] = value
        return value

    def step_seconds(self, shape: ModelShape, masked_tokens: list[int]) -> float:
        flops = sum(self._flops(shape, max(1, t)) for t in masked_tokens) * shape.branches
        return flops / self.flops_per_second + self.step_overhead_seconds

    def transfer_seconds(self, cache_bytes: int) -> float:
        if cache_bytes <= 0:
            return 0.0
        return cache_bytes / self.store_bandwidth_bytes_per_second + self.store_latency_seconds
