"""`make bench`'s UNet script on the tiny preset: stock vs O-caching timed, FLOPs counted on the same calls."""
from __future__ import annotations

import json

import pytest

from loadtest import unet_bench


def test_box_mask_covers_the_ratio():
    m = unet_bench.box_mask(64, 64, 0.25)
    assert m.float().mean().item() == pytest.approx(0.25, abs=0.01)


def test_unet_bench_reports_speedup_beside_the_flop_ideal(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTGENIE_MODELS", str(tmp_path / "models"))
    out = tmp_path / "unet.json"
    assert unet_bench.main(["--preset", "sd2-inpaint-tiny", "--batches", "1", "--ratios", "0.25", "--seconds", "0.01",
                            "--threads", "1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert 0 < row["o_gflop"] < row["stock_gflop"] and row["o_ideal"] > 1
    assert row["o_speedup"] == pytest.approx(row["stock_ms"] / row["o_ms"])
    assert row["computed_cells"] == 64  # an 8 x 8 box of the 16 x 16 latent grid
