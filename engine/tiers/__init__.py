"""Cache tiers below the engine: host-memory cache, per-block load/compute planner and the block loader."""
from .host_cache import CacheStats, HostCache
from .loader import BandwidthModel, BlockLoader, BlockLoadError, LoaderReport, blocks_from_shard
from .planner import Plan, plan_blocks, simulate

__all__ = ["CacheStats", "HostCache", "BandwidthModel", "BlockLoader", "BlockLoadError", "LoaderReport",
           "blocks_from_shard", "Plan", "plan_blocks", "simulate"]
