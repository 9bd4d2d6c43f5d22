"""Poisson traces: deterministic per seed, the right arrival rate, ratio means and exact synthetic mask sizes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from instgenie.engine.masks import tokens_from_mask
from loadtest import trace as tr


def test_same_seed_same_trace_other_seed_other_trace():
    a = tr.poisson_trace(2.0, 60.0, seed=0, dist="production")
    b = tr.poisson_trace(2.0, 60.0, seed=0, dist="production")
    c = tr.poisson_trace(2.0, 60.0, seed=1, dist="production")
    assert a.to_json() == b.to_json()
    assert a.to_json() != c.to_json()


def test_json_round_trip_keeps_every_request_and_mask(tmp_path):
    out = tmp_path / "t.json"
    assert tr.main(["--rate", "3", "--duration", "10", "--seed", "4", "--dist", "public", "--out", str(out)]) == 0
    loaded = tr.Trace.from_json(out.read_text())
    fresh = tr.poisson_trace(3.0, 10.0, seed=4, dist="public")
    assert loaded == fresh
    for r in loaded.requests:
        assert np.array_equal(loaded.mask(r), fresh.mask(r))


def test_mean_inter_arrival_is_one_over_rate():
    rate, duration = 5.0, 4000.0  # ~20,000 arrivals
    t = tr.poisson_trace(rate, duration, seed=3, resolution=(64, 64), cell=16)
    arrivals = np.array([r.arrival for r in t.requests])
    gaps = np.diff(np.concatenate([[0.0], arrivals]))
    n = len(gaps)
    # exponential: the sample mean has s.d. (1/rate)/sqrt(n); 5 sigma leaves no room for flakes
    assert abs(gaps.mean() - 1 / rate) < 5 * (1 / rate) / math.sqrt(n)
    assert abs(n - rate * duration) < 5 * math.sqrt(rate * duration)  # Poisson count
    # memorylessness shape check: P(gap > mean) = e^-1 for an exponential
    p = (gaps > 1 / rate).mean()
    assert abs(p - math.exp(-1)) < 5 * math.sqrt(math.exp(-1) * (1 - math.exp(-1)) / n)
    assert arrivals.max() < duration and np.all(np.diff(arrivals) > 0)


@pytest.mark.parametrize("dist,target", [("production", 0.11), ("public", 0.19)])
def test_mask_ratio_means_match_the_paper(dist, target):
    ratios = tr.sample_ratios(dist, 200_000, np.random.default_rng(0))
    lo, hi = tr.RATIO_RANGE
    assert ratios.min() >= lo and ratios.max() <= hi
    assert abs(ratios.mean() - target) < 0.005  # clipping moves the means by ~0.001
    # what a trace actually computes (token-grid rounding) stays on target too
    t = tr.burst(3000, seed=1, dist=dist)
    token_ratios = np.array([r.token_ratio for r in t.requests])
    assert abs(token_ratios.mean() - target) < 0.01


def test_synthesised_masks_hit_their_ratio_on_the_engines_token_grid():
    t = tr.burst(300, seed=2, dist="public", resolution=(256, 256), cell=16)
    cells = t.grid[0] * t.grid[1]
    kinds = set()
    for r in t.requests:
        kinds.add(r.shape["kind"])
        mask = t.mask(r)
        assert mask.shape == (256, 256) and set(np.unique(mask)) <= {0, 255}
        # exactly round(ratio x tokens) tokens (at least one), so token and pixel ratio agree
        assert abs(r.token_ratio - r.ratio) <= 0.5 / cells + 1e-9 or r.token_ratio == 1 / cells
        assert (mask > 0).mean() == pytest.approx(r.token_ratio)
        # and the engine, with its any-pixel rule (VAE factor 8, 2x2 patches), computes exactly those tokens
        tm = tokens_from_mask(torch.from_numpy(mask > 0), scale_factor=8, latent_channels=16)
        assert tm.ratio == pytest.approx(r.token_ratio)
    assert kinds == set(tr.SHAPES)


def test_the_same_ratio_gives_different_shapes_and_places():
    rng = np.random.default_rng(5)
    grids = [tr.synth_grid(0.2, (16, 16), rng)[0] for _ in range(10)]
    assert all(g.sum() == round(0.2 * 256) for g in grids)
    assert len({g.tobytes() for g in grids}) == 10


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        tr.poisson_trace(0.0, 10.0, seed=0)
    with pytest.raises(ValueError):
        tr.sample_ratios("nope", 3, np.random.default_rng(0))
    with pytest.raises(ValueError):
        tr.poisson_trace(1.0, 10.0, seed=0, resolution=(100, 100), cell=16)
