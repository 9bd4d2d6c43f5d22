"""Algorithm 1 (load-or-recompute per block): hand-computed cases, and what holds of it by brute force."""
from __future__ import annotations

import random

import pytest

from instgenie.engine.tiers.planner import (all_cache_latency, all_full_latency, ideal_latency, optimal_plan,
                                             plan_blocks, sequential_latency, simulate)


def test_large_mask_is_compute_bound_so_every_block_uses_its_cache():
    plan = plan_blocks(6, compute_with_cache=0.8, compute_full=1.0, load=0.15)
    assert plan.use_cache == [True] * 6
    # only the first load is exposed: 0.15 + 6 * 0.8
    assert plan.pipeline_latency == pytest.approx(4.95)
    assert plan.load_finish == pytest.approx([0.15 * (i + 1) for i in range(6)])


def test_first_block_is_recomputed_when_its_exposed_load_costs_more_than_the_cache_saves():
    plan = plan_blocks(6, compute_with_cache=0.9, compute_full=1.0, load=0.3)
    assert plan.use_cache == [False] + [True] * 5  # 0.3 + 0.9 > 1.0; afterwards loads hide behind compute
    assert plan.pipeline_latency == pytest.approx(1.0 + 5 * 0.9)


def test_tiny_mask_with_slow_load_recomputes_leading_blocks_like_fig9():
    plan = plan_blocks(3, compute_with_cache=1.0, compute_full=3.0, load=5.5)
    assert plan.use_cache == [False, False, True]  # Block_0, Block_1 in full while Block_2 loads
    assert plan.compute_finish == pytest.approx([3.0, 6.0, 7.0])
    assert plan.load_finish == pytest.approx([0.0, 0.0, 5.5])
    assert plan.pipeline_latency == pytest.approx(7.0)
    assert sequential_latency(3, 1.0, 5.5) == pytest.approx(19.5)
    assert all_full_latency(3, 3.0) == pytest.approx(9.0)


def test_ties_go_to_the_cache():
    assert plan_blocks(1, 1.0, 3.0, 2.0).use_cache == [True]  # max(2, 0) + 1 == 0 + 3


def test_degenerate_costs():
    assert plan_blocks(4, 1.0, 2.0, 0.0).use_cache == [True] * 4  # free loads
    assert plan_blocks(4, 2.0, 1.5, 0.0).use_cache == [False] * 4  # the cache does not save compute
    empty = plan_blocks(0, 1.0, 2.0, 3.0)
    assert empty.use_cache == [] and empty.pipeline_latency == 0.0


def test_per_block_costs():
    plan = plan_blocks(3, [1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [10.0, 0.1, 0.1])
    assert plan.use_cache == [False, True, True]
    assert plan.compute_finish == pytest.approx([2.0, 3.0, 4.0])
    assert (plan.n_cached, plan.n_full) == (2, 1)


def test_bad_inputs():
    with pytest.raises(ValueError, match="2 entries for 3 blocks"):
        plan_blocks(3, [1.0, 1.0], 2.0, 1.0)
    with pytest.raises(ValueError, match="negative"):
        plan_blocks(2, 1.0, 2.0, -1.0)


def test_greedy_is_not_always_optimal():
    # Caching block 0 keeps the load stream busy when block 1 needs it; recomputing block 0 is better.
    greedy, best = plan_blocks(2, 1.0, 5.0, 3.0), optimal_plan(2, 1.0, 5.0, 3.0)
    assert greedy.use_cache == [True, True] and greedy.pipeline_latency == pytest.approx(7.0)
    assert best.use_cache == [False, True] and best.pipeline_latency == pytest.approx(6.0)


def random_costs(rng: random.Random, per_block: bool, compute_bound: bool = False):
    n = rng.randint(1, 7)
    if per_block:
        c_w = [rng.uniform(0.1, 2.0) for _ in range(n)]
        c_wo = [c + rng.uniform(0.0, 3.0) for c in c_w]
        load = [rng.uniform(0.0, 5.0) for _ in range(n)]
        return n, c_w, c_wo, load
    c_w = rng.uniform(0.1, 2.0)
    load = rng.uniform(0.0, c_w) if compute_bound else rng.uniform(0.0, 5.0)
    return n, c_w, c_w + rng.uniform(0.0, 3.0), load


@pytest.mark.parametrize("per_block", [False, True])
def test_properties_that_always_hold(per_block):
    rng = random.Random(1234)
    for _ in range(400):
        n, c_w, c_wo, load = random_costs(rng, per_block)
        plan = plan_blocks(n, c_w, c_wo, load)
        latency, eps = plan.pipeline_latency, 1e-9
        assert simulate(plan.use_cache, c_w, c_wo, load) == plan  # the plan's timeline is the model's
        assert latency <= all_full_latency(n, c_wo) + eps
        assert latency <= all_cache_latency(n, c_w, load) + eps
        assert latency <= sequential_latency(n, c_w, load) + eps
        assert optimal_plan(n, c_w, c_wo, load).pipeline_latency <= latency + eps
        assert all_cache_latency(n, c_w, load) >= ideal_latency(n, c_w, load) - eps


def test_optimal_when_costs_are_uniform_and_loading_is_not_the_bottleneck():
    rng = random.Random(99)
    for _ in range(400):
        n, c_w, c_wo, load = random_costs(rng, per_block=False, compute_bound=True)
        assert plan_blocks(n, c_w, c_wo, load).pipeline_latency == pytest.approx(
            optimal_plan(n, c_w, c_wo, load).pipeline_latency)


def test_greedy_is_suboptimal_in_a_measurable_share_of_random_cases():
    # Not a property to rely on, a fact to know: the planner leaves latency on the table sometimes.
    rng = random.Random(7)
    worse = sum(plan_blocks(*case).pipeline_latency > optimal_plan(*case).pipeline_latency + 1e-9
                for case in (random_costs(rng, per_block=True) for _ in range(300)))
    assert 0 < worse < 300


def test_ideal_is_a_bound_for_all_cache_schedules_only():
    # When loading dominates, recomputing every block beats even perfect overlap of all the loads.
    assert ideal_latency(3, 1.0, 10.0) == pytest.approx(30.0)
    plan = plan_blocks(3, 1.0, 2.0, 10.0)
    assert plan.use_cache == [False] * 3 and plan.pipeline_latency == pytest.approx(6.0)


def test_simulate_with_a_bounded_number_of_buffers():
    loads, c_w = [1.0, 1.0, 1.0, 6.0], 3.0
    unbounded = simulate([True] * 4, c_w, 9.0, loads)
    assert unbounded.load_finish == pytest.approx([1, 2, 3, 9]) and unbounded.pipeline_latency == pytest.approx(13)
    # With two buffers the last load may only start once block 1 (two loads earlier) has computed, at 7.
    double = simulate([True] * 4, c_w, 9.0, loads, buffers=2)
    assert double.load_finish == pytest.approx([1, 2, 5, 13]) and double.pipeline_latency == pytest.approx(16)
    assert simulate([True] * 4, c_w, 9.0, loads, buffers=4) == unbounded
    # One buffer: no overlap at all between a block's compute and the next load.
    assert all_cache_latency(3, 2.0, 1.0, buffers=1) == pytest.approx(3 * (1.0 + 2.0))
