"""`make bench`'s script on the tiny preset: every variant timed, FLOP ideal beside it, repeats combined by median."""
from __future__ import annotations

import json

import pytest

from loadtest import engine_bench

VARIANTS = ("stock", "kv", "kv_cold", "y", "y_cold")


def test_repeats_are_combined_into_the_median_of_medians(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTGENIE_MODELS", str(tmp_path / "models"))
    out = tmp_path / "bench.json"
    assert engine_bench.main(["--preset", "flux-tiny", "--batches", "1", "--ratios", "0.5", "--seconds", "0.01",
                              "--repeats", "3", "--threads", "1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["repeats"] == 3 and len(row["repeat_kv_efficiency"]) == len(row["repeat_y_efficiency"]) == 3
    for v in VARIANTS:
        assert 0 < row[f"{v}_min_ms"] <= row[f"{v}_ms"]
    for v in VARIANTS[1:]:
        assert row[f"{v}_speedup"] == pytest.approx(row["stock_ms"] / row[f"{v}_ms"])
        assert row[f"{v}_efficiency"] == pytest.approx(row[f"{v}_speedup"] / row[f"{v}_ideal"])
    assert row["kv_ideal"] > row["y_ideal"] > 1


def test_combine_takes_each_variants_median_and_recomputes_the_ratios():
    def cell(stock, kv):
        row = {"reps": 2, "kv_ideal": 4.0, "kv_cold_ideal": 4.0, "y_ideal": 2.0, "y_cold_ideal": 2.0}
        for v, ms in (("stock", stock), ("kv", kv), ("kv_cold", kv), ("y", kv), ("y_cold", kv)):
            row[f"{v}_ms"], row[f"{v}_min_ms"] = ms, ms - 1
        return engine_bench._derive(row)

    row = engine_bench.combine([cell(100, 50), cell(120, 20), cell(80, 30)])
    assert row["stock_ms"] == 100 and row["kv_ms"] == 30 and row["stock_min_ms"] == 79 and row["reps"] == 6
    assert row["kv_efficiency"] == pytest.approx(100 / 30 / 4.0)
    assert row["repeat_kv_efficiency"] == pytest.approx([0.5, 1.5, 2 / 3])
