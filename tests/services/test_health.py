"""Health with real readiness, and reflection behind its flag, on real service processes."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from instgenie.services.common.server import read_ready_file

from .mesh_helpers import health, wait_for


class Service:
    """One service process on an ephemeral loopback port, stopped (and waited for) by the test."""

    def __init__(self, tmp: Path, module: str, *args: str, name: str = "svc", listen: str = "127.0.0.1:0"):
        self.ready = tmp / f"{name}.json"
        self.log = tmp / f"{name}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", module, "--listen", listen,
                                          "--ready-file", str(self.ready), *args],
                                         stdout=out, stderr=subprocess.STDOUT)
        assert wait_for(lambda: read_ready_file(self.ready) is not None or self.proc.poll() is not None, 60), \
            self.log.read_text()
        assert self.proc.poll() is None, self.log.read_text()
        self.address = read_ready_file(self.ready)["address"]

    def serving_flag(self) -> bool:
        return bool((read_ready_file(self.ready) or {}).get("serving"))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.fixture()
def services(tmp_path):
    started = []

    def start(module, *args, name="svc", listen="127.0.0.1:0"):
        s = Service(tmp_path, module, *args, name=name, listen=listen)
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(10)


def test_worker_is_not_serving_while_its_model_cannot_load(services, tmp_path):
    w = services("instgenie.services.worker", "--model", str(tmp_path / "no-such-model"), "--store-dir",
                 str(tmp_path / "store"), name="worker")
    time.sleep(1.0)
    assert health(w.address) == "NOT_SERVING" and not w.serving_flag()
    assert liveness(w.address) == "SERVING"
    assert w.proc.poll() is None
    assert w.stop() == 0


def test_gateway_is_ready_only_while_the_scheduler_answers(services, tmp_path):
    from instgenie.services.common.testing_s3 import free_port

    port = free_port()
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"tenants": {"t": {"keys": ["t-key-0123456789"]}}}))
    gw = services("instgenie.services.gateway", "--scheduler", f"127.0.0.1:{port}", "--store-dir",
                  str(tmp_path / "store"), "--api-keys-file", str(keys), name="gateway")
    assert health(gw.address) == "NOT_SERVING" and not gw.serving_flag()
    assert liveness(gw.address) == "SERVING"  # not ready, but nothing a restart would fix
    sched = services("instgenie.services.scheduler", name="scheduler", listen=f"127.0.0.1:{port}")
    assert wait_for(lambda: health(gw.address) == "SERVING", 30)
    assert gw.serving_flag()
    assert sched.stop() == 0
    assert wait_for(lambda: health(gw.address) == "NOT_SERVING", 30)
    assert gw.stop() == 0


def liveness(address: str) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def _services_via_reflection(address: str) -> list[str]:
    with grpc.insecure_channel(address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=10)
        return sorted(s.name for r in responses for s in r.list_services_response.service)


def test_reflection_only_behind_its_flag(services):
    with_flag = services("instgenie.services.scheduler", "--reflection", name="with")
    without = services("instgenie.services.scheduler", name="without")
    assert wait_for(lambda: with_flag.serving_flag() and without.serving_flag(), 30)
    assert "instgenie.scheduler.v1.SchedulerService" in _services_via_reflection(with_flag.address)
    assert "grpc.health.v1.Health" in _services_via_reflection(with_flag.address)
    with pytest.raises(grpc.RpcError) as err:
        _services_via_reflection(without.address)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert json.loads(with_flag.ready.read_text())["pid"] == with_flag.proc.pid
