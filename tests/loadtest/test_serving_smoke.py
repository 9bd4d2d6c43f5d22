"""The serving benchmark end to end on flux-tiny, and its accounting of requests that do not finish."""
from __future__ import annotations

import json
import threading
import time

import pytest

from loadtest import serving_bench
from loadtest.systems import SYSTEMS, System, Ticket
from loadtest.trace import poisson_trace


@pytest.mark.slow  # ~40 s on two cores: builds flux-tiny and runs all 20 cells
def test_serving_bench_runs_every_system_and_writes_its_outputs(tmp_path):
    out = tmp_path / "out"
    rc = serving_bench.main([
        "--json", str(out / "serving.json"), "--md", str(out / "serving.md"), "--plots", str(out),
        "--preset", "flux-tiny", "--models", str(tmp_path / "models"), "--steps", "2", "--duration", "2",
        "--drain", "3", "--loads", "1.0", "--dists", "production,public", "--max-batch-size", "4",
        "--burst-batches", "2", "--capacity-rounds", "1",
    ])
    assert rc == 0
    result = json.loads((out / "serving.json").read_text())
    names = set(SYSTEMS.values())
    assert {c["system"] for c in result["capacity"]} == names
    for dist in ("production", "public"):
        runs = [r for r in result["runs"] if r["dist"] == dist]
        assert {r["system"] for r in runs} == names
        for r in runs:
            assert r["completed"] + r["failed"] + r["unfinished"] == r["offered"]
            assert r["failed"] == 0, r["errors"]
    for c in result["capacity"]:
        assert c["completed"] == c["offered"] and c["throughput_rps"] > 0
    engine_runs = [r for r in result["runs"] if r["system"] != "diffusers-static" and r["stats"]["steps"]]
    assert engine_runs and all(r["stats"]["overhead_ms_per_step"] is not None for r in engine_runs)
    assert result["headline"] and {h["dist"] for h in result["headline"]} == {"production", "public"}
    for name in ("serving.md", "serving_latency_production.png", "serving_latency_public.png",
                 "serving_throughput.png"):
        assert (out / name).stat().st_size > 0, name
    assert "| ours |" in (out / "serving.md").read_text()


class _Stuck(System):
    """Finishes every other request at once and never the rest (a system that loses requests)."""

    name = "stuck"

    def __init__(self, trace):
        super().__init__(trace, max_batch_size=1)
        self.stopped = threading.Event()

    def start(self):
        self.stopped.clear()

    def submit(self, request):
        ticket = Ticket(request)
        if request.index % 2 == 0:
            ticket.started = ticket.finished = time.monotonic()
            ticket.future.set_result(None)
        return ticket

    def stop(self):
        self.stopped.set()

    def stats(self):
        return {"steps": 0, "mean_batch_size": None, "overhead_ms_per_step": None}


def test_replay_counts_unfinished_requests_and_respects_the_drain_bound():
    trace = poisson_trace(20.0, 0.5, seed=0, resolution=(64, 64), cell=16)
    system = _Stuck(trace)
    t0 = time.monotonic()
    row = serving_bench.replay(system, trace, drain=0.3)
    assert time.monotonic() - t0 < trace.duration + 0.3 + 2.0  # generous: only bounds, never times
    n = len(trace.requests)
    assert row["offered"] == n and row["completed"] == (n + 1) // 2 and row["unfinished"] == n // 2
    assert row["failed"] == 0 and system.stopped.is_set()
