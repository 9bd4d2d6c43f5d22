"""Template heat and the warm planner: how many workers should hold a template, and which ones warm it."""
from __future__ import annotations

import pytest

from instgenie.services.scheduler.costmodel import ModelShape
from instgenie.services.scheduler.placement import Work, WorkerView
from instgenie.services.scheduler.templates import TemplateHeat, WarmAction, WarmPlanner

SHAPE = ModelShape("m", image_tokens=64, text_tokens=4, hidden=32, dual_blocks=1, single_blocks=1, in_channels=4,
                   out_channels=4)


def view(wid, resident=(), loading=(), running=0, model=SHAPE):
    return WorkerView(wid, model, 4, [Work(10, 5)] * running, [], frozenset(resident), frozenset(loading), 16)


def test_heat_decays_with_its_half_life_and_cold_templates_are_dropped():
    now = [0.0]
    heat = TemplateHeat(half_life=10.0, clock=lambda: now[0])
    for _ in range(4):
        heat.observe("t", "m", 100)
    assert heat.heat("t") == pytest.approx(4.0)
    now[0] = 10.0
    assert heat.heat("t") == pytest.approx(2.0)
    heat.observe("t", "m", 100)
    assert heat.snapshot() == {"t": (pytest.approx(3.0), "m", 100)}
    now[0] = 100.0
    assert heat.snapshot() == {} and heat.heat("t") == 0.0


def test_replicas_follow_the_share_of_traffic():
    planner = WarmPlanner(replication=1.0)
    assert planner.wanted(0.15, 128) == 20 and planner.wanted(0.15, 8) == 2
    assert planner.wanted(0.01, 8) == 1 and planner.wanted(0.9, 4) == 4


def test_a_hot_template_is_warmed_on_more_workers_where_host_memory_is_free_first():
    heat = {"hot": (50.0, "m", 1000), "cold": (1.0, "m", 1000)}  # "hot" is almost all the traffic
    views = [view("a", resident={"hot"}), view("b", resident={"x"}, running=0), view("c", running=3)]
    free = {"a": False, "b": False, "c": True}
    actions = WarmPlanner().plan(views, heat, now=0.0, host_free=lambda v, n: free[v.worker_id])
    # 3 workers want ceil(50/51 x 3) = 3 replicas: c first (free memory), then b (evicting "x", a cold one).
    assert actions == [WarmAction("c", "hot", 1000), WarmAction("b", "hot", 1000)]
    # Issued warms count as holders until they land (or time out): nothing is issued twice.
    planner = WarmPlanner(pending_seconds=10.0)
    assert planner.plan(views, heat, 0.0, host_free=lambda v, n: free[v.worker_id]) != []
    assert planner.plan(views, heat, 1.0, host_free=lambda v, n: free[v.worker_id]) == []
    assert planner.plan(views, heat, 11.0, host_free=lambda v, n: free[v.worker_id]) != []


def test_a_template_nobody_holds_is_warmed_where_it_costs_least():
    # Half the traffic: one worker's share of two, so one replica; "u", the other half, is held everywhere.
    heat = {"t": (10.0, "m", 1000), "u": (10.0, "m", 1000)}
    busy, idle = view("busy", resident={"u"}, running=4), view("idle", resident={"u"})
    assert WarmPlanner().plan([busy, idle], heat, 0.0, host_free=lambda v, n: True) == [WarmAction("idle", "t", 1000)]


def test_warming_never_evicts_a_template_hotter_than_the_replica_is_worth():
    heat = {"t": (10.0, "m", 1000), "keep": (30.0, "m", 1000)}
    full = view("full", resident={"keep"})
    assert WarmPlanner().plan([full], heat, 0.0, host_free=lambda v, n: False) == []


def test_cold_templates_other_models_and_full_workers_get_nothing():
    other = ModelShape("other", 64, 4, 32, 1, 1, 4, 4)
    heat = {"lukewarm": (2.0, "m", 1000), "elsewhere": (40.0, "z", 1000)}
    views = [view("a"), view("b", model=other)]
    assert WarmPlanner(min_heat=4.0).plan(views, heat, 0.0, host_free=lambda v, n: True) == []
    full = WorkerView("f", SHAPE, 1, [Work(1, 1)], [], frozenset(), frozenset(), capacity=1)
    assert WarmPlanner().plan([full], {"t": (10.0, "m", 1)}, 0.0, host_free=lambda v, n: True) == []
