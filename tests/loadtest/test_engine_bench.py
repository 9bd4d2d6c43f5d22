"""`make bench`'s script on the tiny preset: every variant timed, FLOP ideal beside it, repeats combined by median."""
from __future__ import annotations

import json

import pytest
import torch

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


def _tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTGENIE_MODELS", str(tmp_path / "models"))
    from instgenie.engine.models.loader import preset_model

    return preset_model("flux-tiny")


@pytest.mark.parametrize("order, run_length, per_turn, reps", [("steady", 2, 2, 4), ("interleaved", 5, 1, 3)])
def test_order_sets_how_many_calls_each_turn_records(tmp_path, monkeypatch, order, run_length, per_turn, reps):
    model = _tiny(tmp_path, monkeypatch)
    row = engine_bench.bench_cell(model, 1, 0.5, seconds=0.0, min_reps=3, order=order, run_length=run_length,
                                  cache_copies=2)
    # turns go on until 3 stock calls are recorded: two turns of 2 in steady order, three of 1 interleaved
    assert row["reps"] == reps and row["order"] == order and row["run_length"] == per_turn
    with pytest.raises(ValueError, match="order"):
        engine_bench.bench_cell(model, 1, 0.5, seconds=0.0, order="random")


def test_sparse_calls_rotate_through_distinct_copies_of_the_step_cache(tmp_path, monkeypatch):
    from instgenie.engine.transformer.synthetic import synthetic_step

    model = _tiny(tmp_path, monkeypatch)
    st = synthetic_step(model, 2, 0.5, "kv")
    seen = []
    monkeypatch.setattr(engine_bench, "sparse_forward", lambda tr, packed: seen.append(packed.caches))
    call = engine_bench._rotating(model.transformer, st, copies=3, shared_modulation=False)
    for _ in range(6):
        call()
    storage = [caches[0].tensors["kv.0.k"].data_ptr() for caches in seen]
    assert len(set(storage[:3])) == 3 and storage[3:] == storage[:3]  # three copies, in turn
    assert all([c.branch for c in caches] == [0, 1] for caches in seen)  # every sequence of the batch
    assert all(torch.equal(caches[0].tensors["kv.0.k"], st.shard["kv.0.k"]) for caches in seen)
