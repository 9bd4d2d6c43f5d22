"""Per-block load-or-recompute planner: the paper's Algorithm 1 (bubble-free pipeline) and timeline helpers.

Model (paper §4.2): block caches load one after another on a load stream while blocks compute in order
on a compute stream. Block i either uses its cache (compute cost C_w, needs its load of cost L finished)
or is computed in full (cost C_wo, no load). With cache, block i starts at max(its load finish, previous
compute finish); the load of block i starts when the load stream is free (Algorithm 1 assumes unlimited
buffering; `simulate(..., buffers=k)` models a loader that may hold only k blocks ahead).

Algorithm 1 is greedy: block by block it takes the option that finishes that block's compute earliest
(ties go to the cache). Properties that hold for every input (checked by brute force in the tests):
  - never slower than computing every block in full,
  - never slower than using the cache for every block with pipelined loads (hence never slower than
    loading everything first, `sequential_latency`),
  - optimal when every block has the same costs and loading is not slower than computing (L <= C_w).
It is not always the optimum over all 2^N choices: using the cache early keeps the load stream busy
when a later block would rather have it free. E.g. N=2, C_w=1, C_wo=5, L=3: greedy caches both blocks
(latency 7); computing block 0 in full while block 1 loads gives 6. `optimal_plan` (exhaustive, small N)
measures that gap.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

Cost = float | Sequence[float]


@dataclass(frozen=True)
class Plan:
    """A per-block choice and the timeline it produces (times from 0 = start of the forward pass)."""

    use_cache: list[bool]
    pipeline_latency: float
    compute_finish: list[float]
    load_finish: list[float]  # load stream's finish time after block i (unchanged by full-compute blocks)

    @property
    def n_cached(self) -> int:
        return sum(self.use_cache)

    @property
    def n_full(self) -> int:
        return len(self.use_cache) - self.n_cached


def _per_block(name: str, cost: Cost, n_blocks: int) -> list[float]:
    if isinstance(cost, (int, float)):
        values = [float(cost)] * n_blocks
    else:
        values = [float(c) for c in cost]
        if len(values) != n_blocks:
            raise ValueError(f"{name} has {len(values)} entries for {n_blocks} blocks")
    if any(v < 0 for v in values):
        raise ValueError(f"{name} has a negative cost")
    return values


def _costs(n_blocks: int, compute_with_cache: Cost, compute_full: Cost, load: Cost):
    if n_blocks < 0:
        raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
    return (_per_block("compute_with_cache", compute_with_cache, n_blocks),
            _per_block("compute_full", compute_full, n_blocks),
            _per_block("load", load, n_blocks))


def plan_blocks(n_blocks: int, compute_with_cache: Cost, compute_full: Cost, load: Cost) -> Plan:
    """Algorithm 1: per block, load its cache iff `max(load_prev + L, comp_prev) + C_w <= comp_prev + C_wo`.

    Costs are seconds (or any common unit), each a scalar for every block or a list with one per block.
    """
    c_w, c_wo, l_m = _costs(n_blocks, compute_with_cache, compute_full, load)
    comp = load_t = 0.0
    use_cache, compute_finish, load_finish = [], [], []
    for i in range(n_blocks):
        with_cache = max(load_t + l_m[i], comp) + c_w[i]
        if with_cache <= comp + c_wo[i]:
            load_t, comp = load_t + l_m[i], with_cache
            use_cache.append(True)
        else:
            comp = comp + c_wo[i]
            use_cache.append(False)
        compute_finish.append(comp)
        load_finish.append(load_t)
    return Plan(use_cache, comp, compute_finish, load_finish)


def simulate(use_cache: Sequence[bool], compute_with_cache: Cost, compute_full: Cost, load: Cost,
             buffers: int | None = None) -> Plan:
    """The timeline of a GIVEN per-block choice under the same model as `plan_blocks`.

    `buffers=None` is Algorithm 1's model (the loader may run arbitrarily far ahead). `buffers=k` models
    `BlockLoader`: the j-th loaded block may only start loading once the (j-k)-th loaded block has been
    computed (its buffer is released), so `simulate(plan.use_cache, ..., buffers=2)` is what a double
    buffered loader achieves with that plan.
    """
    n_blocks = len(use_cache)
    c_w, c_wo, l_m = _costs(n_blocks, compute_with_cache, compute_full, load)
    if buffers is not None and buffers < 1:
        raise ValueError(f"buffers must be >= 1, got {buffers}")
    comp = load_t = 0.0
    released: list[float] = []  # compute finish of each loaded block, in load order
    compute_finish, load_finish = [], []
    for i, cached in enumerate(use_cache):
        if cached:
            start = load_t
            if buffers is not None and len(released) >= buffers:
                start = max(start, released[len(released) - buffers])
            load_t = start + l_m[i]
            comp = max(load_t, comp) + c_w[i]
            released.append(comp)
        else:
            comp += c_wo[i]
        compute_finish.append(comp)
        load_finish.append(load_t)
    return Plan(list(map(bool, use_cache)), comp, compute_finish, load_finish)


def all_cache_latency(n_blocks: int, compute_with_cache: Cost, load: Cost, buffers: int | None = None) -> float:
    """Every block uses its cache, loads pipelined with compute (the paper's strawman, Fig. 9-middle)."""
    return simulate([True] * n_blocks, compute_with_cache, 0.0, load, buffers).pipeline_latency


def all_full_latency(n_blocks: int, compute_full: Cost) -> float:
    """Every block computed in full: no loads at all."""
    return sum(_per_block("compute_full", compute_full, n_blocks))


def sequential_latency(n_blocks: int, compute_with_cache: Cost, load: Cost) -> float:
    """Load every block's cache first, then compute (no overlap: the paper's "naive", Fig. 4)."""
    return sum(_per_block("load", load, n_blocks)) + sum(_per_block("compute_with_cache", compute_with_cache, n_blocks))


def ideal_latency(n_blocks: int, compute_with_cache: Cost, load: Cost) -> float:
    """max(total compute, total load): perfect overlap with the cache in every block.

    A lower bound for every all-cache schedule, not for mixed plans: when loading dominates, computing
    some blocks in full (no load) can beat it.
    """
    return max(sum(_per_block("compute_with_cache", compute_with_cache, n_blocks)),
               sum(_per_block("load", load, n_blocks)))


def optimal_plan(n_blocks: int, compute_with_cache: Cost, compute_full: Cost, load: Cost,
                 buffers: int | None = None, max_blocks: int = 16) -> Plan:
    """Exhaustive search over all 2^N choices (ties prefer more cached blocks); for tests and small N only."""
    if n_blocks > max_blocks:
        raise ValueError(f"exhaustive search over 2^{n_blocks} plans refused (max_blocks={max_blocks})")
    c_w, c_wo, l_m = _costs(n_blocks, compute_with_cache, compute_full, load)
    best: Plan | None = None
    for choice in itertools.product((True, False), repeat=n_blocks):
        plan = simulate(choice, c_w, c_wo, l_m, buffers)
        if best is None or plan.pipeline_latency < best.pipeline_latency - 1e-12:
            best = plan
    return best
