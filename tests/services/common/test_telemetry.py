"""Telemetry setup: every histogram the services create has buckets fit for multi-second edits, names keep the
instgenie_ prefix and metric labels stay low-cardinality; no tracing means no interceptor and a cheap no-op."""
from __future__ import annotations

import argparse
import asyncio
import re
from pathlib import Path

from instgenie.services.common import telemetry

SERVICES = Path(__file__).resolve().parents[3] / "services"


def instruments() -> list[tuple[str, str]]:
    """(kind, name) of every instrument created in the services' code."""
    found = []
    for path in SERVICES.rglob("*.py"):
        for kind, name in re.findall(r"create_(\w+)\(\s*\"(\w+)\"", path.read_text()):
            found.append((kind, name))
    return found


def test_every_histogram_has_explicit_buckets_and_every_name_the_prefix():
    found = instruments()
    assert len(found) >= 25
    assert all(name.startswith("instgenie_") for _, name in found), found
    histograms = {name for kind, name in found if kind == "histogram"}
    assert histograms == set(telemetry.HISTOGRAM_BUCKETS), histograms ^ set(telemetry.HISTOGRAM_BUCKETS)
    for name, buckets in telemetry.HISTOGRAM_BUCKETS.items():
        assert list(buckets) == sorted(buckets) and min(buckets) >= 0, name  # OpenTelemetry takes no negatives
        if name.endswith("_seconds") and "step" not in name and "error" not in name:
            assert max(buckets) >= 600 and 5.0 in buckets, name  # multi-second edits, up to 10 minutes


def test_no_template_or_request_id_is_a_metric_label():
    for path in SERVICES.rglob("*.py"):
        text = path.read_text()
        for call in re.findall(r"\.(?:add|record)\([^)]*\{[^}]*\}", text):
            assert "template" not in call and "request_id" not in call, (path, call)


def test_without_flags_nothing_is_set_up_and_the_hot_path_is_a_no_op():
    tel = telemetry.setup_telemetry("test", argparse.Namespace(metrics_listen="", otlp_endpoint=""))
    assert tel.metrics_address == "" and not tel.tracing
    assert tel.server_interceptors() == [] and tel.ready_info() == {}
    assert telemetry.current_span() is None
    telemetry.span_event("nothing", a=1)  # no span: nothing happens
    telemetry.meter().create_counter("instgenie_test").add(1, {"model": "m"})  # the global no-op meter
    tel.shutdown()


def test_end_stream_cancels_an_uninstrumented_call():
    class Call:
        cancelled = False

        def cancel(self):
            self.cancelled = True

    call = Call()
    asyncio.run(telemetry.end_stream(call))
    assert call.cancelled
