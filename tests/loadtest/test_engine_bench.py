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


@pytest.mark.parametrize("order, calls_per_turn, recorded_per_turn", [("steady", 3, 2), ("interleaved", 1, 1)])
def test_order_sets_the_calls_each_turn_makes_and_records(order, calls_per_turn, recorded_per_turn):
    calls = {"a": 0, "b": 0}

    def variant(name):
        return lambda: calls.__setitem__(name, calls[name] + 1)

    times = engine_bench.measure({"a": variant("a"), "b": variant("b")}, seconds=0.0, min_reps=3, order=order,
                                 run_length=2)
    turns = -(-3 // recorded_per_turn)  # turns go on until "a" has 3 recorded calls
    for name in ("a", "b"):
        assert len(times[name]) == turns * recorded_per_turn
        assert calls[name] == 1 + turns * calls_per_turn  # one warm-up call, then the turns
    with pytest.raises(ValueError, match="order"):
        engine_bench.measure({"a": variant("a")}, seconds=0.0, order="random")


def test_a_cell_reports_its_order_and_copies(tmp_path, monkeypatch):
    model = _tiny(tmp_path, monkeypatch)
    row = engine_bench.bench_cell(model, 1, 0.5, seconds=0.0, min_reps=2, order="steady", run_length=2, copies=2)
    assert (row["order"], row["run_length"], row["cache_copies"], row["reps"]) == ("steady", 2, 2, 2)


def test_sparse_calls_rotate_through_distinct_copies_of_the_step_cache(tmp_path, monkeypatch):
    from instgenie.engine.transformer.synthetic import synthetic_step

    model = _tiny(tmp_path, monkeypatch)
    st = synthetic_step(model, 2, 0.5, "kv")
    seen = []
    monkeypatch.setattr(engine_bench, "sparse_forward", lambda tr, packed: seen.append(packed.caches))
    call = engine_bench._rotating(model.transformer, st, engine_bench.cache_copies(st, 3), shared_modulation=False)
    for _ in range(6):
        call()
    storage = [caches[0].tensors["kv.0.k"].data_ptr() for caches in seen]
    assert len(set(storage[:3])) == 3 and storage[3:] == storage[:3]  # three copies, in turn
    assert all([c.branch for c in caches] == [0, 1] for caches in seen)  # every sequence of the batch
    assert all(torch.equal(caches[0].tensors["kv.0.k"], st.shard["kv.0.k"]) for caches in seen)
