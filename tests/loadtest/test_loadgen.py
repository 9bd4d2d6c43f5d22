"""The gRPC load generator against the real local mesh (two small loads), its report files, and its limits."""
from __future__ import annotations

import json

import numpy as np
import pytest

from loadtest import loadgen
from tests.services.mesh_helpers import TENANTS


def test_only_loopback_targets_are_accepted():
    for ok in ("127.0.0.1:50051", "localhost:1", "[::1]:50051", "127.3.4.5:9"):
        loadgen.check_loopback(ok)
    for bad in ("10.0.0.1:50051", "example.com:443", "0.0.0.0:1", "[2001:db8::1]:1"):
        with pytest.raises(SystemExit):
            loadgen.check_loopback(bad)


def test_zipf_popularity_and_mask_ratios():
    w = loadgen.zipf_weights(4, 1.0)
    assert w.sum() == pytest.approx(1.0) and list(w) == sorted(w, reverse=True) and w[0] / w[1] == pytest.approx(2)
    assert np.allclose(loadgen.zipf_weights(3, 0.0), 1 / 3)
    rng = np.random.default_rng(0)
    for dist in loadgen.DISTRIBUTIONS:
        r = loadgen.mask_ratios(dist, 200, rng)
        assert ((r >= 0.02) & (r <= 0.9)).all()
    assert loadgen.mask_ratios("production", 2000, rng).mean() < loadgen.mask_ratios("uniform", 2000, rng).mean()


@pytest.mark.slow
def test_two_loads_against_the_mesh_give_a_json_markdown_and_png_report(mesh, tmp_path):
    out = tmp_path / "report"
    args = ["--target", mesh.gateway.address, "--api-key", TENANTS["alpha"], "--rates", "4,8", "--duration", "1",
            "--max-requests", "6", "--templates", "2", "--metrics", ",".join(w.metrics for w in mesh.workers),
            "--out", str(out)]
    assert loadgen.main(args) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert [s["offered_rate"] for s in report["summary"]] == [4.0, 8.0]
    for level, s in zip(report["levels"], report["summary"]):
        assert 0 < len(level["records"]) <= 6 and s["ok"] == s["sent"], s
        assert s["latency_p50"] > 0 and s["mean_batch_size"] >= 1 and s["steps"] > 0
    md = out.with_suffix(".md").read_text()
    assert md.count("\n| 4 |") == 1 and md.count("\n| 8 |") == 1
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
