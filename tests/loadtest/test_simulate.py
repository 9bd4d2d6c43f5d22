"""The placement simulator: its workers behave as the engine does, its traces are production-shaped and
reproducible, and it drives the scheduler's own policies, warm planner and speed correction."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from instgenie.services.scheduler.costmodel import ModelShape, request_flops
from instgenie.services.scheduler.profile import Profile, Transfer
from loadtest import simulate
from loadtest.simulate import SimConfig, Simulation, arrivals, make_trace
from loadtest.simworker import SimRequest

SHAPE = ModelShape("m", image_tokens=64, text_tokens=4, hidden=32, dual_blocks=1, single_blocks=1, in_channels=4,
                   out_channels=4, branches=1)


def profile(**kw) -> Profile:
    base = dict(model_id="m", device_kind="cpu", compute_a=1e-9, compute_b=0.002, compute_c=0.001, compute_r2=1.0,
                store_to_host=Transfer(1e8, 0.001), pre_seconds=0.003, post_seconds=0.002,
                details={"shape": dataclasses.asdict(SHAPE)})
    return Profile(**{**base, **kw})


def request(i, arrival, template="t0000", tokens=8, steps=4, cache_bytes=400_000):
    return SimRequest(i, arrival, template, tokens, steps, request_flops(SHAPE, tokens), cache_bytes)


def test_a_lone_request_takes_pre_steps_and_post_and_a_cold_one_waits_for_its_shards():
    prof = profile()
    sim = Simulation(SimConfig(workers=1, requests=2, warm=False), prof)
    step = prof.step_seconds(request_flops(SHAPE, 8), 1)
    warm_up, cold = request(0, 0.0, template="a"), request(1, 10.0, template="b", cache_bytes=40_000_000)
    sim.workers[0].preload("a", warm_up.cache_bytes, 4)
    sim.run([warm_up, cold])
    assert warm_up.finished - warm_up.arrival == pytest.approx(0.003 + 4 * step + 0.002)
    assert warm_up.tier == "host" and cold.tier == "store"
    # 4 shards of 10 MB at 100 MB/s + 1 ms each: the last arrives 0.404 s in; the last step follows it.
    assert cold.finished - cold.arrival == pytest.approx(4 * (0.1 + 0.001) + step + 0.002)
    assert sim.workers[0].bytes_loaded == 40_000_000


def test_requests_join_the_running_batch_at_step_boundaries_up_to_the_batch_size():
    prof = profile()
    sim = Simulation(SimConfig(workers=1, requests=3, max_batch=2, warm=False), prof)
    r0, r1, r2 = reqs = [request(i, 0.0, template="a") for i in range(3)]
    sim.workers[0].preload("a", r0.cache_bytes, 4)
    sim.run(reqs)
    f = request_flops(SHAPE, 8)
    one, two = prof.step_seconds(f, 1), prof.step_seconds(2 * f, 2)
    t0 = 0.003  # all three pre-processed; r0 is first, and a step starts at once
    # r0 alone for a step; r1 joins for r0's last 3 steps; r2 takes r0's slot for r1's last step, then is alone.
    assert r0.finished == pytest.approx(t0 + one + 3 * two + 0.002)
    assert r1.finished == pytest.approx(t0 + one + 4 * two + 0.002)
    assert r2.finished == pytest.approx(t0 + one + 4 * two + 3 * one + 0.002)
    assert sim.workers[0].steps_run == 1 + 3 + 1 + 3


def test_traces_are_production_shaped_and_reproducible():
    cfg = SimConfig(workers=4, requests=4000, templates=500, zipf=1.0, template_steps=(4, 8))
    a, b = make_trace(cfg, SHAPE, 100.0), make_trace(cfg, SHAPE, 100.0)
    assert [(r.arrival, r.template, r.tokens) for r in a] == [(r.arrival, r.template, r.tokens) for r in b]
    counts = {}
    for r in a:
        counts[r.template] = counts.get(r.template, 0) + 1
    assert max(counts, key=counts.get) == "t0000" and len(counts) > 200
    assert np.mean([r.tokens for r in a]) / SHAPE.image_tokens == pytest.approx(0.11, abs=0.01)
    assert {r.steps for r in a} == {4, 8}
    assert len(a) / a[-1].arrival == pytest.approx(100.0, rel=0.05)


def test_bursty_arrivals_keep_the_mean_rate_but_cluster():
    rng = np.random.default_rng(3)
    t = arrivals(50.0, 20000, "bursty", rng)
    assert len(t) / t[-1] == pytest.approx(50.0, rel=0.1)
    gaps = np.diff(t)
    assert gaps.std() / gaps.mean() > 1.2  # a Poisson process has a coefficient of variation of 1
    with pytest.raises(ValueError):
        arrivals(1.0, 10, "weekly", rng)


def test_the_speed_correction_learns_workers_slower_than_profiled():
    prof = profile()
    cfg = SimConfig(workers=4, requests=1500, load=0.6, slow_share=0.5, slow_factor=2.0, templates=4,
                    host_templates=8, warm=False)
    sim = Simulation(cfg, prof)
    row = sim.run(make_trace(cfg, SHAPE, cfg.load * cfg.workers * simulate.capacity(prof, SHAPE, cfg)))
    speeds = sorted(a.speed for a in sim.accuracy.values())
    assert speeds[:2] == [pytest.approx(1.0, abs=0.05)] * 2 and speeds[2:] == [pytest.approx(2.0, abs=0.15)] * 2
    assert row["speed_max"] == pytest.approx(speeds[-1])
    off = Simulation(dataclasses.replace(cfg, correction=False), prof)
    off_row = off.run(make_trace(cfg, SHAPE, cfg.load * cfg.workers * simulate.capacity(prof, SHAPE, cfg)))
    assert row["prediction_mean_abs_rel_error"] < off_row["prediction_mean_abs_rel_error"]


def test_the_simulator_writes_a_table_json_and_a_plot_for_every_policy(tmp_path):
    path = profile().save(tmp_path / "p.json")
    out = tmp_path / "out"
    assert simulate.main(["--profile", str(path), "--workers", "2,4", "--requests-per-worker", "60",
                          "--dists", "production", "--templates", "50", "--host-templates", "4", "--ablations",
                          "--json", str(out / "s.json"), "--md", str(out / "s.md"), "--plots", str(out)]) == 0
    result = json.loads((out / "s.json").read_text())
    rows = result["rows"]
    assert {r["variant"] for r in rows} == {"predicted-finish", "least-requests", "least-masked-tokens",
                                            "round-robin", "predicted-finish - warming",
                                            "predicted-finish - correction"}
    for r in rows:
        assert r["completed"] == r["requests"] == 60 * r["workers"] and r["unfinished"] == 0
        assert 0.0 <= r["hit_ratio"] <= 1.0 and r["decision_us_mean"] > 0 and r["store_bytes"] > 0
        assert r["latency_p50"] <= r["latency_p95"] <= r["latency_p99"]
    assert (out / "simulation.png").stat().st_size > 0
    assert "| 4 | production | 80% | predicted-finish |" in (out / "s.md").read_text()
