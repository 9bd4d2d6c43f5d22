"""Device profiles: least-squares fits, the file format and its integrity, and the fitted cost model."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from instgenie.services.scheduler.costmodel import FittedCostModel, ModelShape, request_flops
from instgenie.services.scheduler.profile import LinearFit, Profile, Regression, Transfer, load_profiles

SHAPE = ModelShape("m", image_tokens=64, text_tokens=4, hidden=32, dual_blocks=1, single_blocks=1, in_channels=4,
                   out_channels=4, branches=2)


def profile(**kw) -> Profile:
    base = dict(model_id="m", device_kind="cpu", compute_a=2e-11, compute_b=0.003, compute_c=0.0005,
                compute_r2=0.997, store_to_host=Transfer(5e8, 0.003, 0.99, "measured"), pre_seconds=0.004,
                post_seconds=0.001, config_hash="abc", details={"shape": dataclasses.asdict(SHAPE)})
    return Profile(**{**base, **kw})


def test_a_line_is_recovered_exactly_and_noise_lowers_r2():
    xs = [1.0, 2.0, 4.0, 8.0]
    fit = LinearFit.fit(xs, [3 * x + 1 for x in xs])
    assert (fit.slope, fit.intercept, fit.r2) == (pytest.approx(3), pytest.approx(1), pytest.approx(1))
    noisy = LinearFit.fit(xs, [3 * x + 1 + e for x, e in zip(xs, [0.5, -0.5, 0.5, -0.5])])
    assert 0.9 < noisy.r2 < 1.0 and noisy.rmse > 0 and noisy.max_rel_residual > 0


def test_a_time_never_fits_a_negative_intercept_or_slope():
    fit = LinearFit.fit([1.0, 2.0, 3.0], [0.9, 2.0, 3.2])  # least squares says intercept -0.2
    assert fit.intercept == 0.0 and fit.slope == pytest.approx((0.9 + 4.0 + 9.6) / 14)
    flat = LinearFit.fit([1.0, 2.0, 3.0], [2.0, 1.9, 1.8])
    assert flat.slope == 0.0 and flat.intercept == pytest.approx(1.9)
    with pytest.raises(ValueError):
        LinearFit.fit([1.0, 1.0], [1.0, 2.0])


def test_regression_recovers_flops_request_and_constant_terms():
    rng = np.random.default_rng(0)
    rows = [[float(f), float(n), 1.0] for f, n in zip(rng.uniform(1e8, 1e10, 40), rng.integers(1, 9, 40))]
    ys = [2e-11 * f + 5e-4 * n + 3e-3 for f, n, _ in rows]
    fit = Regression.fit(["flops", "requests", "one"], rows, ys)
    assert fit.coef("flops") == pytest.approx(2e-11) and fit.coef("requests") == pytest.approx(5e-4)
    assert fit.coef("one") == pytest.approx(3e-3) and fit.r2 == pytest.approx(1.0)
    # A term that would come out negative is pinned to zero and the others refitted.
    ys = [2e-11 * f - 1e-4 * n + 3e-3 for f, n, _ in rows]
    pinned = Regression.fit(["flops", "requests", "one"], rows, ys)
    assert pinned.coef("requests") == 0.0 and pinned.coef("flops") > 0


def test_a_profile_round_trips_through_its_file(tmp_path):
    p = profile()
    path = p.save(tmp_path / "p.json")
    back = Profile.load(path)
    assert back.profile_id == p.profile_id and back.to_dict() == p.to_dict()
    assert p.profile_id.startswith("m@cpu#") and len(p.digest) == 12
    assert profile(compute_a=3e-11).profile_id != p.profile_id


def test_an_edited_or_foreign_file_is_refused(tmp_path):
    data = profile().to_dict()
    data["compute"]["a"] *= 2  # hand-edited constants no longer match the id the file states
    (tmp_path / "edited.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="edited"):
        Profile.load(tmp_path / "edited.json")
    (tmp_path / "other.json").write_text(json.dumps({"r2": 0.998}))
    with pytest.raises(ValueError, match="not a profile"):
        Profile.load(tmp_path / "other.json")
    bad = profile(compute_b=-1.0).to_dict()
    bad.pop("profile_id")
    (tmp_path / "negative.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="negative"):
        Profile.load(tmp_path / "negative.json")


def test_profiles_load_from_files_directories_and_lists(tmp_path):
    a, b = profile(), profile(model_id="n")
    a.save(tmp_path / "dir" / "a.json")
    b.save(tmp_path / "dir" / "b.json")
    single = b.save(tmp_path / "b.json")
    assert sorted(p.model_id for p in load_profiles([str(tmp_path / "dir")])) == ["m", "n"]
    assert [p.model_id for p in load_profiles(f"{single},{tmp_path / 'dir' / 'a.json'}")] == ["n", "m"]
    with pytest.raises(FileNotFoundError):
        load_profiles([str(tmp_path / "missing.json")])


def test_the_fitted_cost_model_uses_the_profile_constants():
    cost = FittedCostModel(profile())
    f = request_flops(SHAPE, 10)
    assert cost.step_time(3 * f, 3) == pytest.approx(2e-11 * 3 * f + 3 * 0.0005 + 0.003)
    assert cost.step_seconds(SHAPE, [10, 10, 10]) == pytest.approx(cost.step_time(3 * f, 3))
    assert cost.linear == (2e-11, 0.003, 0.0005) and not cost.streams_to_device
    assert cost.transfer_seconds(5_000_000, 10) == pytest.approx(0.01 + 10 * 0.003)
    assert (cost.pre_seconds, cost.post_seconds) == (0.004, 0.001)
    # With a device link, a step also waits for its step shards: max(compute, transfer).
    gpu = FittedCostModel(profile(host_to_device=Transfer(1e9, 0.0)))
    assert gpu.streams_to_device and gpu.linear is None
    assert gpu.step_time(f, 1, device_bytes=100_000_000) == pytest.approx(0.1)
    assert gpu.step_time(f, 1, device_bytes=1_000) == pytest.approx(cost.step_time(f, 1))


def test_flops_count_every_guidance_branch_and_the_cache_mode():
    one_branch = dataclasses.replace(SHAPE, branches=1)
    assert request_flops(SHAPE, 10) == pytest.approx(2 * request_flops(one_branch, 10))
    assert request_flops(SHAPE, 10, "y") > request_flops(SHAPE, 10, "kv")
    assert request_flops(SHAPE, 0) == request_flops(SHAPE, 1)  # at least one token
    assert request_flops(SHAPE, 10_000) == request_flops(SHAPE, 64)  # at most every image token
