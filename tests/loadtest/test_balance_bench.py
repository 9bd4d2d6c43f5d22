"""The load-balancing benchmark end to end on a real local mesh (tiny: one load, a few seconds per policy), and
its headline's reading of which loads were sustained."""
from __future__ import annotations

import json

import pytest

from loadtest import balance_bench, balance_report


@pytest.mark.slow  # ~1 min on two cores: profiles, starts the mesh, registers templates, replays 4 short traces
def test_balance_bench_runs_every_policy_on_the_same_trace_and_writes_its_outputs(tmp_path):
    out = tmp_path / "out"
    rc = balance_bench.main([
        "--quick-profile", "--templates", "4", "--host-templates", "2", "--store-mbps", "50", "--loads", "0.3", "--duration", "3",
        "--drain", "20", "--burst", "16", "--rounds", "1", "--workdir", str(tmp_path / "work"), "--json", str(out / "b.json"),
        "--md", str(out / "b.md"), "--plots", str(out)])
    assert rc == 0
    result = json.loads((out / "b.json").read_text())
    runs = result["runs"]
    assert {r["policy"] for r in runs} == set(balance_bench.POLICIES)
    assert len({r["offered"] for r in runs}) == 1  # the same trace for every policy
    assert result["config"]["capacity_rps"] > 0
    for r in runs:
        assert r["completed"] + r["failed"] + r["unfinished"] == r["offered"] > 0
        assert r["failed"] == 0, r["errors"]
        assert r["placed_resident"] + r["placed_loading"] + r["placed_cold"] == r["completed"]
        assert 0.0 <= r["hit_ratio"] <= 1.0 and r["prediction_edits"] == r["completed"]
        # Both workers announced the measured profile and their read cap; the scheduler predicts them with both
        # (the local S3 server reads at hundreds of MB/s, above the cap).
        assert len(r["cost_models"]) == 2
        assert all("(announced), store reads capped at 50 MB/s" in c for c in r["cost_models"].values())
    assert result["headline"]["base"] == "least-requests"
    assert (out / "balance.png").stat().st_size > 0
    assert "| least-requests |" in (out / "b.md").read_text()
    assert "object-store reads capped at 50 MB/s per worker" in (out / "b.md").read_text()


def _run(policy, load, p95, sustained=True):
    return {"policy": policy, "load": load, "rate": 10 * load, "latency_p95": p95, "latency_mean": p95 / 2,
            "hit_ratio": 0.5, "sustained": sustained}


def test_the_headline_compares_at_the_highest_load_least_requests_sustains():
    runs = [_run("least-requests", 0.5, 1.0), _run("predicted-finish", 0.5, 0.9),
            _run("least-requests", 0.7, 2.0), _run("predicted-finish", 0.7, 1.5),
            _run("least-requests", 0.9, 9.0, sustained=False), _run("predicted-finish", 0.9, 2.0)]
    h = balance_report.headline({"runs": runs})
    assert h["load"] == 0.7 and h["reduction"] == pytest.approx(0.25)
    assert "25 % lower" in h["text"]
    none = balance_report.headline({"runs": [_run("least-requests", 0.5, 1.0, sustained=False)]})
    assert none["load"] is None and "none" in none["text"]
