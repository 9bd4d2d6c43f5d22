"""Faults over a real mesh: a worker killed mid-batch, a worker drained by SIGTERM, the object store down,
admission limits. Each test gets a mesh of its own, since it breaks it."""
from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest

from instgenie.gateway.v1 import edit_service_pb2 as pb
from instgenie.services.common.testing_s3 import S3Server
from instgenie.status import parse_rpc_error

from .mesh_helpers import auth, channel, create_template, digit, half_mask, health, png, start_mesh, stub, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture()
def own_mesh(tmp_path, request):
    overrides = getattr(request, "param", {})
    m = start_mesh(tmp_path / "mesh", **overrides)
    yield m
    m.stop()


class Outcome:
    """One stream's events as they arrive, then its final status (None = it ended with a result)."""

    def __init__(self):
        self.events: list = []
        self.status = None
        self.ended: float | None = None

    def kinds(self) -> list[str]:
        return [e.WhichOneof("event") for e in list(self.events)]

    def worker(self) -> str | None:
        started = [e.started.worker for e in list(self.events) if e.WhichOneof("event") == "started"]
        return started[-1] if started else None


def run_streams(s, template: str, count: int, deadline: float, prefix: str):
    """Start `count` 200-step edits at once, each read by its own thread into an Outcome."""
    outcomes = {f"{prefix}-{i}": Outcome() for i in range(count)}

    def go(i, rid):
        out = outcomes[rid]
        try:
            for e in s.StreamEdit(pb.StreamEditRequest(edit=pb.EditRequest(
                    template_id=template, mask=png(half_mask()), prompt="6", seed=i, request_id=rid)),
                    metadata=auth(), timeout=deadline):
                out.events.append(e)
        except grpc.RpcError as exc:
            out.status = parse_rpc_error(exc)
        out.ended = time.monotonic()

    threads = [threading.Thread(target=go, args=(i, rid)) for i, rid in enumerate(outcomes)]
    for t in threads:
        t.start()
    return threads, outcomes


def progressing(outcomes) -> bool:
    return any("progress" in o.kinds() for o in outcomes.values())


def test_worker_killed_mid_batch_every_request_is_answered(own_mesh):
    m = own_mesh
    with channel(m) as ch:
        s = stub(ch)
        tpl = create_template(s, image=digit(5), prompt="5", steps=200)
        start, deadline = time.monotonic(), 90.0
        threads, outcomes = run_streams(s, tpl, 6, deadline, "kill")
        assert wait_for(lambda: progressing(outcomes), timeout=30)
        victim_name = next(o.worker() for o in outcomes.values() if o.worker())
        victim = next(w for w in m.workers if w.name == victim_name)
        on_victim = [rid for rid, o in outcomes.items() if o.worker() == victim_name]
        os.killpg(victim.pid, signal.SIGKILL)
        for t in threads:
            t.join(deadline + 10)
        survivor = next(w.name for w in m.workers if w is not victim)
        for rid, o in outcomes.items():
            assert o.ended is not None and o.ended - start < deadline, f"{rid} outlived its deadline"
            if o.status is None:
                assert o.kinds()[-1] == "result", rid
                assert o.events[-1].result.worker == survivor, f"{rid} finished on {o.events[-1].result.worker}"
            else:  # a clear status, never a hang
                assert o.status.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), o.status
                assert o.status.message
        # The requests that were on the killed worker were placed again and finished on the survivor.
        assert on_victim and all(outcomes[rid].status is None for rid in on_victim)
        result = s.Edit(pb.EditRequest(template_id=tpl, mask=png(half_mask()), prompt="1", seed=1), metadata=auth(),
                        timeout=60).result
        assert result.worker == survivor


def test_sigterm_drains_the_running_batch_then_exits(own_mesh):
    m = own_mesh
    with channel(m) as ch:
        s = stub(ch)
        tpl = create_template(s, image=digit(5), prompt="5", steps=200)
        threads, outcomes = run_streams(s, tpl, 2, 120.0, "drain")
        assert wait_for(lambda: progressing(outcomes), timeout=30)
        name = next(o.worker() for o in outcomes.values() if o.worker())
        worker = next(w for w in m.workers if w.name == name)
        os.killpg(worker.pid, signal.SIGTERM)
        assert wait_for(lambda: _not_serving(worker.address), timeout=5)
        for t in threads:
            t.join(120)
        for rid, o in outcomes.items():
            assert o.status is None, f"{rid}: {o.status}"
            assert o.kinds()[-1] == "result"
        assert worker.popen.wait(30) == 0
        # New work goes to the other worker.
        result = s.Edit(pb.EditRequest(template_id=tpl, mask=png(half_mask()), prompt="1", seed=2), metadata=auth(),
                        timeout=60).result
        assert result.worker != name


def _not_serving(address: str) -> bool:
    try:
        return health(address, timeout=1.0) != "SERVING"
    except grpc.RpcError:
        return True


@pytest.mark.parametrize("own_mesh", [{"workers": 1}], indirect=True)
def test_object_store_down_resident_templates_keep_working(own_mesh):
    m = own_mesh
    with channel(m) as ch:
        s = stub(ch)
        tpl = create_template(s, image=digit(3))
        req = pb.EditRequest(template_id=tpl, mask=png(half_mask()), prompt="8", seed=1)
        before = s.Edit(req, metadata=auth(), timeout=60).result
        port = m.s3.port
        m.s3.stop()
        try:
            time.sleep(5.5)  # past the gateway's record cache: it must serve what it knows without the store
            during = s.Edit(req, metadata=auth(), timeout=60).result
            assert during.image == before.image and not during.degraded_reason
            with pytest.raises(grpc.RpcError) as err:
                s.CreateTemplate(pb.CreateTemplateRequest(image=png(digit(4)), prompt="4"), metadata=auth(),
                                 timeout=30)
            info = parse_rpc_error(err.value)
            assert info.code == grpc.StatusCode.UNAVAILABLE and "store" in info.message.lower()
        finally:
            m.s3 = S3Server(m.state / "s3", port=port).start()
        after = s.Edit(req, metadata=auth(), timeout=60).result
        assert after.image == before.image
        assert create_template(s, image=digit(4), prompt="4")


@pytest.mark.parametrize("own_mesh", [{"workers": 1, "scheduler_args": ["--max-in-flight", "2"]}], indirect=True)
def test_admission_limit_answers_resource_exhausted_with_a_retry_hint(own_mesh):
    m = own_mesh
    with channel(m) as ch:
        s = stub(ch)
        tpl = create_template(s, image=digit(5), prompt="5", steps=200)
        threads, outcomes = run_streams(s, tpl, 2, 60.0, "adm")
        assert wait_for(lambda: progressing(outcomes), timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            s.Edit(pb.EditRequest(template_id=tpl, mask=png(half_mask()), prompt="1"), metadata=auth(), timeout=30)
        info = parse_rpc_error(err.value)
        assert info.code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.reason == "CLUSTER_FULL"
        assert info.retry_after is not None and info.retry_after > 0
        for t in threads:
            t.join(60)
        assert all(o.status is None for o in outcomes.values())
