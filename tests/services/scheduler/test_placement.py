"""Placement policies: the predicted-finish simulation of step-level batching, affinity, and the baselines."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from instgenie.services.scheduler.costmodel import AnalyticalCostModel, CostModel, ModelShape
from instgenie.services.scheduler.placement import (Choice, LeastMaskedTokens, LeastRequests, PlacementRequest,
                                                    PredictedFinish, RoundRobin, Work, WorkerView, make_policy,
                                                    predict_finish, simulate_finish)

SHAPE = ModelShape("m", image_tokens=1024, text_tokens=16, hidden=64, dual_blocks=1, single_blocks=1,
                   in_channels=16, out_channels=16)


class LinearCost(CostModel):
    """step = 0.01 s + 0.001 s per computed token (+ c per request); transfer = 1 s per MB. Easy to reason about.

    A request's "FLOPs" are its tokens, so step times read directly off the token counts."""

    def __init__(self, c: float = 0.0, pre: float = 0.0, post: float = 0.0):
        self.c, self.pre_seconds, self.post_seconds = c, pre, post

    def request_flops(self, shape, tokens, mode="kv", image_tokens=0):
        return float(tokens)

    def step_time(self, flops, requests=1, device_bytes=0):
        return 0.01 + 0.001 * flops + self.c * requests

    @property
    def linear(self):
        return 0.001, 0.01, self.c

    def transfer_seconds(self, cache_bytes, objects=1):
        return cache_bytes / 1e6 if cache_bytes > 0 else 0.0


class SteppedCost(LinearCost):
    """The same times, but not declared linear: predictions take the step-by-step simulation."""

    @property
    def linear(self):
        return None


class StreamingCost(LinearCost):
    """A device that streams step shards host -> device at 1 MB/s, overlapped with compute: max(both)."""

    @property
    def linear(self):
        return None

    @property
    def streams_to_device(self):
        return True

    def step_time(self, flops, requests=1, device_bytes=0):
        return max(super().step_time(flops, requests), device_bytes / 1e6)


def view(wid="w", running=(), waiting=(), resident=(), batch=4, capacity=32, loading=(), **kw):
    return WorkerView(wid, SHAPE, batch, [Work(*r) for r in running], [Work(*w) for w in waiting],
                      frozenset(resident), frozenset(loading), capacity, **kw)


def req(tokens=10, steps=10, template="t", cache_bytes=0):
    return PlacementRequest("m", template, tokens, steps, cache_bytes)


def test_idle_worker_runs_alone():
    assert predict_finish(view(), req(10, 20), LinearCost()) == pytest.approx(20 * 0.02)


def test_step_time_is_the_batch_time_not_the_sum_of_requests():
    # One running request with 5 steps left; the new one joins at once and shares every step.
    t = predict_finish(view(running=[(10, 5)]), req(10, 8), LinearCost())
    assert t == pytest.approx(5 * 0.03 + 3 * 0.02)


def test_per_request_step_cost_counts_once_per_request_in_the_batch():
    t = predict_finish(view(running=[(10, 5)]), req(10, 8), LinearCost(c=0.005))
    assert t == pytest.approx(5 * (0.03 + 0.01) + 3 * (0.02 + 0.005))


def test_full_batch_waits_for_the_first_slot():
    busy = view(running=[(10, 3), (10, 9)], batch=2)
    # 3 steps of the two running (0.03 s each), then the new request joins: 6 steps together, then 4 alone.
    t = predict_finish(busy, req(10, 10), LinearCost())
    assert t == pytest.approx(3 * 0.03 + 6 * 0.03 + 4 * 0.02)


def test_waiting_requests_go_first():
    t_empty = predict_finish(view(batch=1), req(10, 10), LinearCost())
    t_queued = predict_finish(view(batch=1, waiting=[(10, 10)]), req(10, 10), LinearCost())
    assert t_queued == pytest.approx(2 * t_empty)


def test_cache_transfer_gates_the_first_and_the_last_step_unless_resident():
    # 10 steps of 0.02 s; the cold cache is 10 shards of 50 kB (0.05 s each at 1 MB/s): the steps outrun the
    # shards, so the last step waits for the last shard (0.5 s) and the edit ends one step later.
    cold = predict_finish(view(), req(10, 10, cache_bytes=500_000), LinearCost())
    warm = predict_finish(view(resident={"t"}), req(10, 10, cache_bytes=500_000), LinearCost())
    assert warm == pytest.approx(0.2)
    assert cold == pytest.approx(0.5 + 0.02)
    half = predict_finish(view(loading={"t"}), req(10, 10, cache_bytes=500_000), LinearCost())
    assert warm < half < cold


def test_a_small_cold_cache_costs_only_its_first_shard():
    # 10 shards of 1 kB: the first arrives after 1 ms, the rest long before their steps need them.
    assert predict_finish(view(), req(10, 10, cache_bytes=10_000), LinearCost()) == pytest.approx(0.001 + 0.2)


def test_transfer_overlaps_with_the_running_batch():
    busy = view(running=[(10, 10)], batch=1)
    # The only slot is busy for 0.2 s; a 150 kB cache is in by then: the transfer costs nothing.
    assert predict_finish(busy, req(10, 10, cache_bytes=150_000), LinearCost()) == pytest.approx(0.2 + 0.2)
    # A 2.5 MB cache arrives after 2.5 s: the last step waits for it.
    assert predict_finish(busy, req(10, 10, cache_bytes=2_500_000), LinearCost()) == pytest.approx(2.5 + 0.02)


def test_a_cold_load_queues_behind_what_the_link_is_loading():
    free = predict_finish(view(), req(10, 10, cache_bytes=500_000), LinearCost())
    queued = predict_finish(view(link_backlog=1.0), req(10, 10, cache_bytes=500_000), LinearCost())
    assert queued == pytest.approx(free + 1.0)
    # A resident template does not care what the link is doing.
    assert predict_finish(view(resident={"t"}, link_backlog=1.0), req(10, 10, 500_000), LinearCost()) \
        == pytest.approx(0.2)


def test_pre_and_post_processing_frame_the_prediction():
    cost = LinearCost(pre=0.05, post=0.03)
    # Idle: the request joins once pre-processed, and is answered after post-processing.
    assert predict_finish(view(), req(10, 10), cost) == pytest.approx(0.05 + 0.2 + 0.03)
    # A running batch steps on while the newcomer is pre-processed: it joins at the first boundary after 0.05 s
    # (0.06 s, three 0.02 s steps in).
    t = predict_finish(view(running=[(10, 20)]), req(10, 10), cost)
    assert t == pytest.approx(3 * 0.02 + 10 * 0.03 + 0.03)


def test_a_step_under_way_delays_joining_to_its_end():
    # 0.015 s of the current 0.02 s step have run: the newcomer joins in 0.005 s.
    t = predict_finish(view(running=[(10, 1)], mid_step=True, elapsed=0.015), req(10, 10), LinearCost())
    assert t == pytest.approx(0.005 + 10 * 0.02)


def test_a_slower_worker_is_predicted_slower():
    cost = LinearCost()
    assert predict_finish(view(speed=1.5), req(10, 10), cost) == pytest.approx(1.5 * 0.2)
    slow, fast = view("slow", speed=2.0), view("fast", running=[(10, 5)])
    assert PredictedFinish(cost).choose(req(10, 10), [slow, fast]).worker_id == "fast"


def test_each_worker_is_predicted_with_its_own_cost_model():
    fast = view("a", cost=AnalyticalCostModel(flops_per_second=1e12, step_overhead_seconds=0.001))
    slow = view("b", cost=AnalyticalCostModel(flops_per_second=1e9, step_overhead_seconds=0.001))
    choice = PredictedFinish(AnalyticalCostModel()).choose(req(100, 10), [slow, fast])
    assert choice.worker_id == "a"


@pytest.mark.parametrize("c", [0.0, 0.004])
def test_the_timeline_fast_path_equals_the_step_by_step_simulation(c):
    """The closed form (a linear cost: joining only lengthens the steps it shares) against stepping through."""
    rng = np.random.default_rng(1)
    fast, slow = LinearCost(c=c, pre=0.01, post=0.02), SteppedCost(c=c, pre=0.01, post=0.02)
    for _ in range(400):
        batch = int(rng.integers(1, 6))
        running = [(int(rng.integers(1, 300)), int(rng.integers(1, 30))) for _ in range(rng.integers(0, batch + 1))]
        waiting = [(int(rng.integers(1, 300)), int(rng.integers(1, 30))) for _ in range(rng.integers(0, 4))]
        mid = bool(rng.integers(2)) and bool(running)
        v = view(running=running, waiting=waiting, batch=batch, resident={"t"} if rng.integers(2) else set(),
                 loading={"t"} if rng.integers(4) == 0 else set(), speed=float(rng.uniform(0.5, 2.0)),
                 mid_step=mid, elapsed=float(rng.uniform(0, 0.01)) if mid else 0.0,
                 link_backlog=float(rng.uniform(0, 0.5)) if rng.integers(2) else 0.0)
        r = req(int(rng.integers(1, 300)), int(rng.integers(1, 30)), cache_bytes=int(rng.integers(0, 2_000_000)))
        want = simulate_finish(v, r, slow) + slow.post_seconds
        assert predict_finish(v, r, fast) == pytest.approx(want, rel=1e-9, abs=1e-9), (v, r)


def test_a_streaming_device_takes_the_longer_of_compute_and_transfer_per_step():
    # 10 tokens: compute 0.02 s; a 10-step cache of 1 MB: 0.1 MB per step shard = 0.1 s over the link.
    t = predict_finish(view(resident={"t"}), req(10, 10, cache_bytes=1_000_000), StreamingCost())
    assert t == pytest.approx(10 * 0.1)
    assert predict_finish(view(resident={"t"}), req(10, 10, cache_bytes=10_000), StreamingCost()) \
        == pytest.approx(10 * 0.02)


def test_predicted_finish_beats_request_count():
    """Two short requests finish sooner than one long one: counting requests gets this backwards."""
    few_long = view("long", running=[(400, 50)], batch=1)
    many_short = view("short", running=[(10, 2), (10, 2)], batch=2)
    new = req(10, 10)
    assert PredictedFinish(LinearCost()).choose(new, [few_long, many_short]).worker_id == "short"
    assert LeastRequests().choose(new, [few_long, many_short]).worker_id == "long"


def test_the_worker_holding_the_template_is_preferred():
    a, b = view("a"), view("b", resident={"t"})
    # Equal predictions (no transfer): affinity breaks the tie.
    assert PredictedFinish(LinearCost()).choose(req(cache_bytes=0), [a, b]).worker_id == "b"
    # A cold cache costs the other worker its transfer.
    assert PredictedFinish(LinearCost()).choose(req(cache_bytes=10**6), [a, b]).worker_id == "b"


def test_affinity_slack_keeps_a_template_where_it_is_unless_that_is_much_slower():
    holder = view("holder", resident={"t"}, running=[(10, 10)])  # the newcomer's steps: 0.03 s instead of 0.02
    idle = view("idle")
    r = req(10, 10, cache_bytes=1_000)  # 1 ms of transfer: the idle worker is faster
    assert PredictedFinish(LinearCost()).choose(r, [holder, idle]).worker_id == "idle"
    assert PredictedFinish(LinearCost(), affinity_slack=0.6).choose(r, [holder, idle]).worker_id == "holder"
    assert PredictedFinish(LinearCost(), affinity_slack=0.2).choose(r, [holder, idle]).worker_id == "idle"


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
    two_branches = dataclasses.replace(SHAPE, branches=2)
    assert cost.step_seconds(two_branches, [100]) == pytest.approx(2 * one)
    assert cost.step_seconds(SHAPE, [100], mode="y") > one  # Y mode also projects K/V of unmasked tokens
    assert cost.transfer_seconds(0) == 0.0


def test_policy_is_chosen_by_name():
    assert isinstance(make_policy("predicted-finish"), PredictedFinish)
    assert make_policy("predicted-finish", affinity_slack=0.3).affinity_slack == 0.3
    assert make_policy("round-robin").name == "round-robin"
    assert isinstance(make_policy("least-requests"), LeastRequests)
    with pytest.raises(ValueError, match="unknown placement policy"):
        make_policy("fastest")
    assert Choice("w", 1.0).worker_id == "w"
