"""Split KV attention in the cost model: the FLOP count, the fitted d term, profile format v2, one formula for all."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from types import SimpleNamespace

import pytest

from instgenie.cli_profile import fit_profile
from instgenie.engine.flops import cached_attention_flops, step_flops
from instgenie.services.scheduler.costmodel import FittedCostModel, ModelShape, request_cached_flops, request_flops
from instgenie.services.scheduler.placement import PlacementRequest, WorkerView, Work, predict_finish, simulate_finish
from instgenie.services.scheduler.profile import Profile, Transfer

SHAPE = ModelShape("m", image_tokens=64, text_tokens=4, hidden=32, dual_blocks=1, single_blocks=2, in_channels=4,
                   out_channels=4, branches=2)
N, T, H, BLOCKS = 64, 4, 32, 3


def profile(**kw) -> Profile:
    base = dict(model_id="m", device_kind="cpu", compute_a=2e-11, compute_b=0.003, compute_c=0.0005,
                compute_r2=0.997, store_to_host=Transfer(5e8, 0.003, 0.99, "measured"), pre_seconds=0.004,
                post_seconds=0.001, config_hash="abc", details={"shape": dataclasses.asdict(SHAPE)})
    return Profile(**{**base, **kw})


def test_split_kv_attention_is_counted_as_the_engine_computes_it():
    flux = SHAPE.flux
    for m in (1, 10, 38, 63):
        joint = step_flops(flux, N, T, m, "kv")
        split = step_flops(flux, N, T, m, "kv", kv_attention="split")
        # the joint buffer: (m + t) queries x (n + t) keys; split: a pass over all n cached rows (the m stale
        # ones masked, still computed) and one over the m + t fresh rows -- (m + t) x m more
        assert split - joint == pytest.approx(2.0 * BLOCKS * 2 * (m + T) * m * H)
        assert cached_attention_flops(flux, N, T, m) == pytest.approx(2.0 * BLOCKS * 2 * (m + T) * N * H)
    # a full mask leaves no cached row: one fresh pass, as the joint count; Y mode and stock do not split
    assert step_flops(flux, N, T, N, "kv", kv_attention="split") == step_flops(flux, N, T, N, "kv")
    assert cached_attention_flops(flux, N, T, N) == 0.0 and cached_attention_flops(flux, N, T, 5, "joint") == 0.0
    assert step_flops(flux, N, T, 5, "y", kv_attention="split") == step_flops(flux, N, T, 5, "y")
    assert request_cached_flops(SHAPE, 5, "y", "split") == 0.0
    assert request_cached_flops(SHAPE, 5, "kv", "split") == pytest.approx(2 * cached_attention_flops(flux, N, T, 5))
    with pytest.raises(ValueError):
        step_flops(flux, N, T, 5, "kv", kv_attention="fused")


def _cells(a: float, d: float, c: float, b: float) -> list[dict]:
    cells = []
    for mode in ("kv", "y"):
        for batch in (1, 2, 4, 8):
            for tokens in (3, 10, 19, 38, 64):
                f = batch * request_flops(SHAPE, tokens, mode, "split")
                x = batch * request_cached_flops(SHAPE, tokens, mode, "split")
                cells.append({"mode": mode, "batch": batch, "tokens": tokens, "flops": f,
                              "cached_attention_flops": x, "flops_joint": batch * request_flops(SHAPE, tokens, mode),
                              "seconds": a * f + d * x + c * batch + b})
    return cells


def _fit(cells: list[dict], kv_attention: str = "split") -> Profile:
    model = SimpleNamespace(info=SimpleNamespace(model_id="m", config_hash="abc"))
    compute = {"shape": SHAPE, "cells": cells, "kv_attention": kv_attention, "pre_seconds": 0.004,
               "post_seconds": 0.001, "template_steps": 11}
    store = [{"bytes": n, "seconds": n / 5e8 + 0.002} for n in (2 ** 17, 2 ** 20, 2 ** 23)]
    copy = [{"bytes": n, "seconds": n / 1e10} for n in (2 ** 17, 2 ** 20, 2 ** 23)]
    return fit_profile(model, "cpu", compute, store, copy, 0.0, {"store": "test", "device": "cpu"})


def test_a_synthetic_profile_is_fitted_back_to_its_constants_and_the_scheduler_predicts_it():
    a, d, c, b = 2.5e-11, 8e-11, 6e-4, 2.2e-3
    cells = _cells(a, d, c, b)
    prof = Profile.from_dict(json.loads(json.dumps(_fit(cells).to_dict())))  # through the file format
    assert prof.kv_attention == "split" and prof.compute_r2 == pytest.approx(1.0)
    assert (prof.compute_a, prof.compute_d, prof.compute_c, prof.compute_b) == (
        pytest.approx(a), pytest.approx(d), pytest.approx(c), pytest.approx(b))
    # the v1 form (joint FLOPs, no d) cannot express the surcharge: it is kept beside the fit, worse
    assert prof.details["compute_fit_v1"]["r2"] < 0.999
    cost = FittedCostModel(prof)
    for cell in cells:
        flops = cell["batch"] * cost.request_flops(SHAPE, cell["tokens"], cell["mode"])
        assert cost.step_time(flops, cell["batch"]) == pytest.approx(cell["seconds"])
        batch = [cell["tokens"]] * cell["batch"]
        assert cost.step_seconds(SHAPE, batch, cell["mode"]) == pytest.approx(cell["seconds"])
        assert prof.step_seconds(cell["flops"], cell["batch"], cell["cached_attention_flops"]) == pytest.approx(
            cell["seconds"])


def test_a_grid_without_cached_passes_fits_no_d():
    cells = [c for c in _cells(2.5e-11, 8e-11, 6e-4, 2.2e-3) if c["mode"] == "y"]
    prof = _fit(cells, "joint")
    assert prof.compute_d == 0.0 and prof.compute_r2 == pytest.approx(1.0)


def _v1_digest(p: Profile) -> str:
    """The digest format v1 computed (before d and kv_attention existed)."""
    consts = [p.model_id, p.device_kind, p.config_hash, p.compute_a, p.compute_b, p.compute_c,
              dataclasses.asdict(p.store_to_host), None, p.pre_seconds, p.post_seconds]
    return hashlib.sha256(json.dumps(consts, sort_keys=True).encode()).hexdigest()[:12]


def test_a_v1_profile_loads_with_d_zero_joint_attention_and_its_old_id():
    old = profile()
    data = old.to_dict()
    data["schema"] = "instgenie.profile/v1"
    data["compute"] = {"form": "seconds = a * flops + c * requests + b", "a": old.compute_a, "b": old.compute_b,
                       "c": old.compute_c, "r2": old.compute_r2}
    data["profile_id"] = f"m@cpu#{_v1_digest(old)}"
    loaded = Profile.from_dict(data)
    assert loaded.compute_d == 0.0 and loaded.kv_attention == "joint"
    assert loaded.profile_id == data["profile_id"]  # a worker announcing the old id still matches
    cost = FittedCostModel(loaded)
    assert cost.request_flops(SHAPE, 10) == request_flops(SHAPE, 10)  # the count it was fitted with
    # v2 constants change the id; a wrong kv_attention or a negative d is refused
    assert profile(compute_d=1e-11, kv_attention="split").profile_id != loaded.profile_id
    for bad in ({"kv_attention": "fused"}, {"d": -1.0}):
        v2 = profile().to_dict()
        v2.pop("profile_id")
        v2["compute"].update(bad)
        with pytest.raises(ValueError):
            Profile.from_dict(v2)


def test_placement_charges_the_term_through_the_one_flop_function():
    prof = profile(compute_d=6e-11, kv_attention="split")
    cost = FittedCostModel(prof)
    f, x = request_flops(SHAPE, 20, "kv", "split"), request_cached_flops(SHAPE, 20, "kv", "split")
    assert cost.request_flops(SHAPE, 20) == pytest.approx(f + 3.0 * x)  # d / a = 3: at the dense rate
    assert cost.step_time(cost.request_flops(SHAPE, 20), 1) == pytest.approx(prof.step_seconds(f, 1, x))
    # the linear timeline and the step-by-step simulation predict the same finish with it
    view = WorkerView("w", SHAPE, 4, running=[Work(38, 5), Work(64, 3)], waiting=[Work(10, 7)],
                      resident=frozenset({"t"}), cost=cost)
    request = PlacementRequest("m", "t", 20, 6, 1000)
    assert predict_finish(view, request) == pytest.approx(simulate_finish(view, request, cost) + cost.post_seconds)
    cheaper = WorkerView("w", SHAPE, 4, running=[Work(38, 5), Work(64, 3)], waiting=[Work(10, 7)],
                         resident=frozenset({"t"}), cost=FittedCostModel(profile(kv_attention="split")))
    assert predict_finish(view, request) > predict_finish(cheaper, request)
