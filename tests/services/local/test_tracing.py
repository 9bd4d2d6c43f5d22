"""One edit through the local mesh is one trace: spans from the gateway, the scheduler (through its flight) and
the worker, sent over OTLP/gRPC to a collector in the test, with an event per denoising step on the worker."""
from __future__ import annotations

import urllib.request
import uuid

import pytest

from instgenie.gateway.v1 import edit_service_pb2 as pb
from tests.services.mesh_helpers import auth, channel, create_template, half_mask, png, stub, wait_for

pytestmark = pytest.mark.slow

SERVICES = {"instgenie-gateway", "instgenie-scheduler", "instgenie-worker"}


def attribute(span, key: str) -> str:
    for a in span.attributes:
        if a.key == key:
            return a.value.string_value
    return ""


def test_one_edit_is_one_trace_across_the_three_services_with_per_step_events(observed_mesh, otlp_sink):
    with channel(observed_mesh) as ch:
        s = stub(ch)
        template = create_template(s)
        rid = f"trace-{uuid.uuid4().hex[:8]}"
        result = s.Edit(pb.EditRequest(request_id=rid, template_id=template, mask=png(half_mask()), prompt="8",
                                       seed=1), metadata=auth(), timeout=120).result
    mesh_rid = f"alpha-{rid}"  # the id the edit carries inside the mesh (tenant-scoped)

    def traced():
        spans = otlp_sink.snapshot()
        mine = {s.trace_id for _, s in spans if attribute(s, "instgenie.request_id") == mesh_rid}
        if len(mine) != 1:
            return None
        trace_id = next(iter(mine))
        trace = [(svc, s) for svc, s in spans if s.trace_id == trace_id]
        services = {svc for svc, _ in trace}
        ids = {s.span_id for _, s in trace}
        # spans are exported as they end, each process on its own: wait until the tree has a single root
        whole = sum(1 for _, s in trace if s.parent_span_id not in ids) == 1
        return trace if services == SERVICES and whole else None

    assert wait_for(lambda: traced() is not None, timeout=30), \
        f"no complete trace of {mesh_rid}: {[(svc, s.name) for svc, s in otlp_sink.snapshot()][-20:]}"
    trace = traced()
    spans = {s.span_id: (svc, s) for svc, s in trace}
    names = {(svc, s.name) for svc, s in trace}
    assert ("instgenie-gateway", "/instgenie.gateway.v1.EditService/Edit") in names
    assert ("instgenie-scheduler", "scheduler.flight") in names
    assert ("instgenie-worker", "/instgenie.worker.v1.WorkerService/Edit") in names

    # Every span but the gateway's server span has its parent in the trace: one tree, rooted at the gateway.
    roots = [(svc, s.name) for svc, s in trace if s.parent_span_id not in spans]
    assert roots == [("instgenie-gateway", "/instgenie.gateway.v1.EditService/Edit")], roots
    # The worker's span hangs under the scheduler's flight span (the context went through the queue).
    worker = next(s for svc, s in trace if svc == "instgenie-worker" and s.name.endswith("WorkerService/Edit"))
    chain, parent = [], worker.parent_span_id
    while parent in spans:
        svc, span = spans[parent]
        chain.append((svc, span.name))
        parent = span.parent_span_id
    assert ("instgenie-scheduler", "scheduler.flight") in chain
    assert chain[-1] == ("instgenie-gateway", "/instgenie.gateway.v1.EditService/Edit")

    steps = [e for e in worker.events if e.name == "engine.step"]
    assert [int(next(a.value.int_value for a in e.attributes if a.key == "step")) for e in steps] == \
        list(range(1, result.steps + 1))
    assert any(e.name == "engine.started" for e in worker.events)
    flight = next(s for _, s in trace if s.name == "scheduler.flight")
    assert {e.name for e in flight.events} >= {"placed", "worker.started"}
    # Health checks and load reports are never traced.
    assert not [s.name for _, s in otlp_sink.snapshot() if "Health" in s.name or "ReportLoad" in s.name]


def test_an_http_edit_is_one_trace_rooted_at_the_http_server_span(observed_mesh, otlp_sink):
    """The HTTP front opens a server span per request, named by route; the gRPC calls it makes hang under it."""
    from tests.services.gateway.http.helpers import call, openai_mask, right_half

    with channel(observed_mesh) as ch:
        template = create_template(stub(ch))
    base = observed_mesh.http_url
    status, _, body = call(base, "POST", "/v1/images/edits", fields={
        "template_id": template, "mask": ("mask.png", openai_mask(right_half())), "prompt": "8", "seed": "2"})
    assert status == 200, body
    assert call(base, "GET", "/healthz")[0] == 200
    assert call(base, "GET", "/web/")[0] == 200
    assert call(base, "GET", f"/v1/templates/{template}")[0] == 200
    assert call(base, "GET", "/v1/nowhere/12345")[0] == 404
    assert call(base, "FOOBAR123", "/v1/models")[0] == 405
    # the client's Host header has no say in what is traced
    request = urllib.request.Request(base + "/v1/models", headers={
        "Host": "evil/web/", "Authorization": auth()[0][1]})
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.status == 200

    def traced():
        spans = otlp_sink.snapshot()
        roots = [s for svc, s in spans if svc == "instgenie-gateway" and s.name == "POST /v1/images/edits"]
        if len(roots) != 1:
            return None
        trace = [(svc, s) for svc, s in spans if s.trace_id == roots[0].trace_id]
        ids = {s.span_id for _, s in trace}
        whole = sum(1 for _, s in trace if s.parent_span_id not in ids) == 1
        return trace if {svc for svc, _ in trace} == SERVICES and whole else None

    assert wait_for(lambda: traced() is not None, timeout=30), \
        f"no complete HTTP trace: {[(svc, s.name) for svc, s in otlp_sink.snapshot()][-20:]}"
    trace = traced()
    ids = {s.span_id for _, s in trace}
    roots = [(svc, s.name) for svc, s in trace if s.parent_span_id not in ids]
    assert roots == [("instgenie-gateway", "POST /v1/images/edits")], roots
    names = {(svc, s.name) for svc, s in trace}
    assert ("instgenie-scheduler", "scheduler.flight") in names
    assert ("instgenie-worker", "/instgenie.worker.v1.WorkerService/Edit") in names
    root = next(s for _, s in trace if s.parent_span_id not in ids)
    assert attribute(root, "http.route") == "/v1/images/edits"
    # One name per route whatever the ids in the URL; unknown URLs share one name; probes have no span.
    expected = {"GET /v1/templates/{template_id}", "GET unmatched", "HTTP /v1/models", "GET /v1/models"}
    assert wait_for(lambda: expected <= {
        s.name for svc, s in otlp_sink.snapshot() if svc == "instgenie-gateway"}, timeout=30)
    gateway = {s.name for svc, s in otlp_sink.snapshot() if svc == "instgenie-gateway"}
    leaked = [n for n in gateway if any(w in n for w in ("healthz", "web", "12345", "FOOBAR", template))]
    assert not leaked, gateway
