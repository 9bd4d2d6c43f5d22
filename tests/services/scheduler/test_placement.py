"""Placement policies: the predicted-finish simulation of step-level batching, affinity, and the baselines."""
from __future__ import annotations

import numpy as np
import pytest

from instgenie.services.scheduler.costmodel import AnalyticalCostModel, ModelShape
from instgenie.services.scheduler.placement import (Choice, LeastMaskedTokens, LeastRequests, PlacementRequest,
                                                    PredictedFinish, RoundRobin, Work, WorkerView, make_policy,
                                                    predict_finish)

SHAPE = ModelShape("m", image_tokens=1024, text_tokens=16, hidden=64, dual_blocks=1, single_blocks=1,
                   in_channels=16, out_channels=16)


class LinearCost:
    """step = 0.01 s + 0.001 s per computed token; transfer = 1 s per MB. Easy to reason about."""

    def step_seconds(self, shape, masked_tokens):
        return 0.01 + 0.001 * sum(masked_tokens)

    def transfer_seconds(self, cache_bytes):
        return cache_bytes / 1e6


def view(wid="w", running=(), waiting=(), resident=(), batch=4, capacity=32, loading=()):
    return WorkerView(wid, SHAPE, batch, [Work(*r) for r in running], [Work(*w) for w in waiting],
                      frozenset(resident), frozenset(loading), capacity)


def req(tokens=10, steps=10, template="t", cache_bytes=0):
    return PlacementRequest("m", template, tokens, steps, cache_bytes)


def test_idle_worker_runs_alone():
    assert predict_finish(view(), req(10, 20), LinearCost()) == pytest.approx(20 * 0.02)


def test_step_time_is_the_batch_time_not_the_sum_of_requests():
    # One running request with 5 steps left; the new one joins at once and shares every step.
    t = predict_finish(view(running=[(10, 5)]), req(10, 8), LinearCost())
    assert t == pytest.approx(5 * 0.03 + 3 * 0.02)


def test_full_batch_waits_for_the_first_slot():
    busy = view(running=[(10, 3), (10, 9)], batch=2)
    # 3 steps of the two running (0.03 s each), then the new request joins: 6 steps together, then 4 alone.
    t = predict_finish(busy, req(10, 10), LinearCost())
    assert t == pytest.approx(3 * 0.03 + 6 * 0.03 + 4 * 0.02)


def test_waiting_requests_go_first():
    t_empty = predict_finish(view(batch=1), req(10, 10), LinearCost())
    t_queued = predict_finish(view(batch=1, waiting=[(10, 10)]), req(10, 10), LinearCost())
    assert t_queued == pytest.approx(2 * t_empty)


def test_cache_transfer_delays_the_start_unless_resident():
    cold = predict_finish(view(), req(10, 10, cache_bytes=500_000), LinearCost())
    warm = predict_finish(view(resident={"t"}), req(10, 10, cache_bytes=500_000), LinearCost())
    assert warm == pytest.approx(0.2)
    assert cold == pytest.approx(0.5 + 0.2)
    half = predict_finish(view(loading={"t"}), req(10, 10, cache_bytes=500_000), LinearCost())
    assert warm < half < cold


def test_transfer_overlaps_with_the_running_batch():
    # The cache arrives after 0.15 s while the only slot is busy for 0.2 s anyway: the transfer costs nothing.
    busy = view(running=[(10, 10)], batch=1)
    assert predict_finish(busy, req(10, 10, cache_bytes=150_000), LinearCost()) == pytest.approx(0.2 + 0.2)
    # A cache that arrives after the slot frees delays the start to its arrival.
    assert predict_finish(busy, req(10, 10, cache_bytes=250_000), LinearCost()) == pytest.approx(0.25 + 0.2)


def test_predicted_finish_beats_request_count():
    """Two short requests finish sooner than one long one: counting requests gets this backwards."""
    few_long = view("long", running=[(400, 50)], batch=1)
    many_short = view("short", running=[(10, 2), (10, 2)], batch=2)
    new = req(10, 10)
    assert PredictedFinish(LinearCost()).choose(new, [few_long, many_short]).worker_id == "short"
    assert LeastRequests().choose(new, [few_long, many_short]).worker_id == "long"


def test_affinity_breaks_ties_and_pays_off():
    a, b = view("a"), view("b", resident={"t"})
    assert PredictedFinish(LinearCost()).choose(req(cache_bytes=0), [a, b]).worker_id == "b"
    assert PredictedFinish(LinearCost()).choose(req(cache_bytes=10**6), [a, b]).worker_id == "b"


def test_full_workers_are_skipped_and_none_when_all_full():
    full = view("full", running=[(1, 5)] * 4, waiting=[(1, 5)] * 4, capacity=8)
    free = view("free", running=[(1, 50)] * 4, capacity=8)
    for policy in (PredictedFinish(LinearCost()), LeastRequests(), LeastMaskedTokens(), RoundRobin()):
        assert policy.choose(req(), [full, free]).worker_id == "free"
        assert policy.choose(req(), [full]) is None


def test_least_masked_tokens_and_round_robin():
    a, b = view("a", running=[(100, 5)]), view("b", running=[(5, 5), (5, 5)])
    assert LeastMaskedTokens().choose(req(), [a, b]).worker_id == "b"
    rr = RoundRobin()
    assert [rr.choose(req(), [a, b]).worker_id for _ in range(4)] == ["a", "b", "a", "b"]


def test_more_load_never_predicts_an_earlier_finish():
    """With room for everyone, another running request only makes every step longer.

    Two effects make it non-monotone elsewhere, rightly: with a full batch, a short request ahead in FCFS can
    displace a larger waiting one past our steps; and a request whose cache is still loading joins at the first
    step boundary after its arrival, and extra load moves the boundaries (by less than one step)."""
    rng = np.random.default_rng(0)
    cost = AnalyticalCostModel(flops_per_second=1e9)
    for _ in range(300):
        running = [(int(rng.integers(1, 300)), int(rng.integers(1, 30))) for _ in range(rng.integers(0, 6))]
        waiting = [(int(rng.integers(1, 300)), int(rng.integers(1, 30))) for _ in range(rng.integers(0, 4))]
        r = req(int(rng.integers(1, 300)), int(rng.integers(1, 30)), cache_bytes=int(rng.integers(0, 10**9)))
        for resident in ({"t"}, set()):
            base = predict_finish(view(running=running, waiting=waiting, batch=64, resident=resident), r, cost)
            more = predict_finish(view(running=running + [(50, 10)], waiting=waiting, batch=64, resident=resident),
                                  r, cost)
            slack = 0.0 if resident else cost.step_seconds(SHAPE, [t for t, _ in running + waiting] + [50, r.tokens])
            assert more >= base - slack - 1e-9


def test_analytical_cost_grows_with_tokens_and_branches():
    cost = AnalyticalCostModel(flops_per_second=1e10, step_overhead_seconds=0.0)
    one = cost.step_seconds(SHAPE, [100])
    assert cost.step_seconds(SHAPE, [100, 100]) == pytest.approx(2 * one)
    assert cost.step_seconds(SHAPE, [200]) > one
    two_branches = ModelShape(**{**SHAPE.__dict__, "branches": 2})
    assert cost.step_seconds(two_branches, [100]) == pytest.approx(2 * one)
    assert cost.transfer_seconds(0) == 0.0


def test_make_policy():
    assert isinstance(make_policy("predicted-finish"), PredictedFinish)
    assert make_policy("round-robin").name == "round-robin"
    with pytest.raises(ValueError, match="unknown placement policy"):
        make_policy("fastest")
    assert Choice("w", 1.0).worker_id == "w"
