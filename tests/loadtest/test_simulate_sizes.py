"""The simulator's templates of their own sizes (`--template-tokens`): each request's FLOPs and cache counted at
its template's size, placement told that size, and traces of default-size templates unchanged."""
from __future__ import annotations

import dataclasses

import pytest

from instgenie.engine.flops import UNetShape
from instgenie.services.scheduler.costmodel import UNET, ModelShape, request_flops
from loadtest.simulate import SimConfig, Simulation, cache_bytes, make_trace
from tests.loadtest.test_simulate import SHAPE, profile


def test_each_template_has_a_size_drawn_once_and_counted_at_it():
    cfg = SimConfig(workers=2, requests=600, templates=50, template_tokens=(64, 256))
    trace = make_trace(cfg, SHAPE, 50.0)
    sizes: dict[str, int] = {}
    for r in trace:
        assert sizes.setdefault(r.template, r.image_tokens) == r.image_tokens, "one size per template"
        assert r.flops == request_flops(SHAPE, r.tokens, image_tokens=r.image_tokens)
        assert r.cache_bytes == cache_bytes(SHAPE, r.steps, image_tokens=r.image_tokens)
        assert 1 <= r.tokens <= r.image_tokens
    assert set(sizes.values()) == {64, 256}
    big = [r for r in trace if r.image_tokens == 256]
    assert cache_bytes(SHAPE, 8, image_tokens=256) == 4 * cache_bytes(SHAPE, 8)
    assert sum(r.tokens for r in big) / len(big) / 256 == pytest.approx(0.11, abs=0.03)  # the ratio, of its size


def test_default_size_traces_are_what_they_were():
    base = SimConfig(workers=2, requests=300, templates=50)
    plain = make_trace(base, SHAPE, 50.0)
    same_size = make_trace(dataclasses.replace(base, template_tokens=(SHAPE.image_tokens,)), SHAPE, 50.0)
    key = [(r.arrival, r.template, r.tokens, r.steps, r.flops, r.cache_bytes) for r in plain]
    assert key == [(r.arrival, r.template, r.tokens, r.steps, r.flops, r.cache_bytes) for r in same_size]
    assert all(r.image_tokens == SHAPE.image_tokens for r in plain)


def test_a_simulation_with_sized_templates_runs_and_places_them():
    cfg = SimConfig(workers=2, requests=200, templates=20, template_tokens=(16, 64, 256), load=0.6)
    prof = profile()
    sim = Simulation(cfg, prof)
    row = sim.run(make_trace(cfg, sim.shape, 30.0, sim.cost))
    assert row["completed"] == 200 and row["latency_p95"] > 0


def test_unet_cache_bytes_are_its_o_caches():
    sd2 = UNetShape((32, 64, 64), (1, 1, 1), (True, True, False), (True, True, False), (1, 1, 1), True, 32, 9, 4,
                    128)
    shape = ModelShape("u", 256, 77, 0, 0, 0, 9, 4, 2, UNET, sd2)
    # per step and branch, a 12 x 20 latent grid: 3 blocks at level 0 (240 tokens, 32 channels), 3 at level 1
    # (60 tokens, 64 channels), the mid block's at level 2 (15 tokens)
    per = 3 * 240 * 32 + 3 * 60 * 64 + 15 * 64
    assert sd2.o_cache_elements(240) == per
    assert cache_bytes(shape, 5, 4, 240) == 5 * 2 * per * 4
