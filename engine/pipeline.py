"""Bubble-free cache streaming inside one denoising step: block loader wiring, block costs and the planner.

Per step, the batch's cache shards (host memory) are streamed to the device block by block by a BlockLoader
(a CUDA side stream, or on CPU a thread with a bandwidth model) while the transformer computes; compute waits
only for the block it is about to use. In Y mode the planner (the paper's Algorithm 1) may decide that a
block is cheaper to recompute in full than to wait for its cache; that block is then never loaded.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from .tiers.loader import BandwidthModel, BlockLoader, LoaderReport
from .tiers.planner import Plan, plan_blocks
from .transformer.cache_view import tensor_name
from .transformer.sparse import sparse_forward
from .transformer.synthetic import synthetic_step


@dataclass
class BlockCosts:
    """Seconds per block: with cache = a_cached * computed tokens + b_cached; full = a_full * all tokens + b_full."""

    a_cached: float
    b_cached: float
    a_full: float
    b_full: float

    def with_cache(self, computed_tokens: int) -> float:
        return self.a_cached * computed_tokens + self.b_cached

    def full(self, image_tokens: int) -> float:
        return self.a_full * image_tokens + self.b_full

    @classmethod
    def calibrate(cls, model, ratios=(0.1, 0.5), batch: int = 2, repeats: int = 3) -> "BlockCosts":
        """Time Y-mode forwards with every block cached and every block in full, fit per-block lines."""
        steps = [synthetic_step(model, batch, ratio, "y", seed=3) for ratio in ratios]
        return cls.measure(model.transformer, [(st.packed, st.index, st.inputs["latents"].shape[1]) for st in steps],
                           repeats)

    @classmethod
    def measure(cls, transformer, cells, repeats: int = 3) -> "BlockCosts":
        """Fit from timed forwards: `cells` = [(packed(use_cache=...) -> PackedStep, token index, image tokens)].

        Timing synchronises the device, so on a GPU it measures the kernels, not their launch.
        """
        n_blocks = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
        points_cached, points_full = [], []
        for packed_fn, index, image_tokens in cells:
            computed = sum(int(i.numel()) for i in index)
            for use_cache, points, tokens in (([True] * n_blocks, points_cached, computed),
                                              ([False] * n_blocks, points_full, len(index) * image_tokens)):
                packed = packed_fn(use_cache=use_cache)
                device = packed.x.device
                sparse_forward(transformer, packed)  # warm-up
                times = []
                for _ in range(repeats):
                    _sync(device)
                    t0 = time.perf_counter()
                    sparse_forward(transformer, packed)
                    _sync(device)
                    times.append(time.perf_counter() - t0)
                points.append((tokens, statistics.median(times) / n_blocks))
        a_c, b_c = _line(points_cached)
        a_f, b_f = _line(points_full)
        if a_f == 0:  # full compute does not depend on the ratio: one point, spread over the token count
            a_f, b_f = points_full[0][1] / points_full[0][0], 0.0
        return cls(a_c, b_c, a_f, b_f)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    (x0, y0), (x1, y1) = points[0], points[-1]
    if x1 == x0:
        return 0.0, y0
    a = max(0.0, (y1 - y0) / (x1 - x0))
    return a, max(0.0, y0 - a * x0)


@dataclass
class PipelineConfig:
    """How a worker streams caches to the device. bandwidth=None means "no modelled link" (CPU: plain copies)."""

    bandwidth: BandwidthModel | None = None
    planner: bool = True  # Y mode only; KV mode cannot compute a block in full
    buffers: int = 2
    device: str = "cpu"
    #: on CPU, really copy host -> "device" buffers (True) or only model the link time (False: like a DMA engine)
    copy_on_cpu: bool = False
    costs: BlockCosts | None = None
    reports: list = field(default_factory=list)  # LoaderReport of recent steps, for metrics and benchmarks
    plans: list = field(default_factory=list)

    def keep(self, report: LoaderReport, plan: Plan | None, limit: int = 64) -> None:
        self.reports.append(report)
        self.plans.append(plan)
        del self.reports[:-limit], self.plans[:-limit]


class StreamedCache:
    """BlockCache of one sequence whose blocks arrive through a BlockLoader."""

    def __init__(self, loader: BlockLoader, shard_index: int, branch: int):
        self.loader, self.prefix, self.branch = loader, f"{shard_index}:", branch

    def kv(self, block: int):
        t = self.loader.wait(block)
        return (t[self.prefix + tensor_name("kv", block, "k")][self.branch],
                t[self.prefix + tensor_name("kv", block, "v")][self.branch])

    def y(self, block: int):
        return self.loader.wait(block)[self.prefix + tensor_name("y", block)][self.branch]


def block_bytes(shards: list[dict], block: int) -> int:
    tag = f".{block}."
    return sum(t.nbytes for shard in shards for name, t in shard.items() if tag in name + ".")


def plan_step(config: PipelineConfig, mode: str, shards: list[dict], n_blocks: int, computed_tokens: int,
              image_tokens: int) -> Plan | None:
    """Algorithm 1 over this batch's costs, or None when every block must use its cache."""
    if mode != "y" or not config.planner or config.costs is None or config.bandwidth is None:
        return None
    loads = [config.bandwidth.seconds(block_bytes(shards, b)) for b in range(n_blocks)]
    return plan_blocks(n_blocks, config.costs.with_cache(computed_tokens), config.costs.full(image_tokens), loads)


def open_loader(config: PipelineConfig, shards: list[dict], n_blocks: int, use_cache: list[bool]) -> BlockLoader:
    """A loader streaming block b of every shard in the batch; tensor names are prefixed by shard position."""
    per_block: list[dict] = [{} for _ in range(n_blocks)]
    for i, shard in enumerate(shards):
        for name, tensor in shard.items():
            per_block[int(name.split(".")[1])][f"{i}:{name}"] = tensor
    return BlockLoader(lambda b: per_block[b], use_cache, device=config.device, bandwidth=config.bandwidth,
                       buffers=config.buffers, copy_on_cpu=config.copy_on_cpu)


def sequential_load(config: PipelineConfig, shards: list[dict], n_blocks: int) -> float:
    """Baseline: move every block before computing (what a system without the pipeline does). Returns seconds."""
    t0 = time.perf_counter()
    loader = open_loader(config, shards, n_blocks, [True] * n_blocks)
    try:
        for b in range(n_blocks):
            loader.wait(b)
            loader.release(b)
    finally:
        loader.close()
    return time.perf_counter() - t0


__all__ = ["BandwidthModel", "BlockCosts", "PipelineConfig", "StreamedCache", "open_loader", "plan_step",
           "sequential_load", "torch"]
