"""`instgenie profile` on this machine: a small grid on the digits model, the fits, the file, and its use."""
from __future__ import annotations

import json

import pytest

from instgenie import cli
from instgenie.services.scheduler.costmodel import FittedCostModel, ModelShape
from instgenie.services.scheduler.profile import Profile

GRID = ["--batches", "1,3", "--masks", "0.25,1.0", "--modes", "kv,y", "--repeats", "2", "--warmup", "1",
        "--transfer-sizes", "0.125,0.5,2", "--transfer-repeats", "1"]


@pytest.mark.slow  # a few seconds: registers two templates and times 8 cells
def test_profile_measures_fits_and_writes_a_profile_the_scheduler_loads(tmp_path, capsys):
    out = tmp_path / "digits.json"
    assert cli.main(["profile", "--model", "digits", "--out", str(out), "--link-bandwidth", "2e9", *GRID]) == 0
    text = capsys.readouterr().out
    assert "R² =" in text and "| kv | 3 |" in text and f"wrote {out}" in text
    prof = Profile.load(out)
    assert prof.model_id == "digits-16px" and prof.device_kind == "cpu"
    assert prof.profile_id == json.loads(out.read_text())["profile_id"]
    cells = prof.details["compute_cells"]
    assert len(cells) == 8 and {c["mode"] for c in cells} == {"kv", "y"}
    assert 0.0 <= prof.compute_r2 <= 1.0 and prof.details["compute_fit_plain"]["r2"] <= prof.compute_r2 + 1e-9
    assert min(prof.compute_a, prof.compute_b, prof.compute_c) >= 0
    assert prof.store_to_host.bandwidth > 0 and len(prof.details["store_points"]) == 3
    # CPU: no device link of its own; --link-bandwidth models one, and says so.
    assert prof.host_to_device.bandwidth == 2e9 and prof.host_to_device.source.startswith("modelled")
    # On CPU the engine splits KV attention into a pass over the cached keys and one over the fresh rows: the
    # FLOPs are counted that way and the masked pass gets its own rate d (0 at a full mask, 0 in Y mode).
    assert prof.kv_attention == "split" and prof.compute_d >= 0
    assert all((c["cached_attention_flops"] > 0) == (c["mode"] == "kv" and c["tokens"] < 64) for c in cells)
    assert "v1 form" in text and prof.details["compute_fit_v1"]["r2"] <= 1.0
    cost = FittedCostModel(prof)
    shape = ModelShape(**prof.details["shape"])
    for c in cells:  # the scheduler's FLOP count and step time give the fit the profile reports
        flops = c["batch"] * cost.request_flops(shape, c["tokens"], c["mode"])
        assert cost.step_time(flops, c["batch"]) == pytest.approx(c["fitted"])
    assert prof.pre_seconds > 0 and prof.post_seconds > 0


def test_profile_of_a_model_that_does_not_load_fails_with_its_reason(tmp_path, capsys):
    assert cli.main(["profile", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "p.json"), *GRID]) == 1
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "p.json").exists()


@pytest.mark.slow  # a few seconds: one UNet template, 6 cells of the tiny preset
def test_a_unet_profile_is_fitted_with_the_unet_flop_count(tmp_path, capsys):
    from instgenie.engine.flops import unet_step_flops
    from instgenie.services.scheduler.costmodel import UNET

    out = tmp_path / "unet.json"
    grid = ["--batches", "1,2", "--masks", "0.1,0.4,1.0", "--repeats", "2", "--warmup", "1",
            "--transfer-sizes", "0.125,0.5", "--transfer-repeats", "1"]
    assert cli.main(["profile", "--model", "sd2-inpaint-tiny", "--out", str(out), *grid]) == 0
    assert "| o | 2 |" in capsys.readouterr().out  # the model's own cache mode, by default
    prof = Profile.load(out)
    shape = ModelShape(**prof.details["shape"])
    assert shape.family == UNET and shape.unet is not None and shape.image_tokens == 16 * 16
    cells = prof.details["compute_cells"]
    assert len(cells) == 6 and {c["mode"] for c in cells} == {"o"}
    assert not any(c["cached_attention_flops"] for c in cells) and prof.compute_d == 0
    for c in cells:
        one = c["flops"] / c["batch"]
        full = shape.branches * unet_step_flops(shape.unet, 256, shape.text_tokens)
        assert 0 < one <= full and (one == full) == (c["tokens"] == 256)
        # the scheduler's compact-mask estimate of the same request is within a few % of its exact count
        assert FittedCostModel(prof).request_flops(shape, c["tokens"]) == pytest.approx(one, rel=0.05)
    by_tokens = sorted({c["tokens"]: c["flops"] / c["batch"] for c in cells}.items())
    assert [f for _, f in by_tokens] == sorted(f for _, f in by_tokens)  # more mask, more work
