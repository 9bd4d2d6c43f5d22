"""The scheduler process with `--discover-workers`, pointed by a kubeconfig at a FAKE Kubernetes API (the HTTP
server of test_discovery.py on a loopback port; no real API server installs here): a worker whose pod stops
being ready gets no new work and shows as `unready` in the scheduler's metrics; ready again, it is live again.
Also: the scheduler serves /metrics on the ephemeral port its ready file names."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

from instgenie.scheduler.v1 import scheduler_service_pb2 as spb
from instgenie.scheduler.v1 import scheduler_service_pb2_grpc as spb_grpc
from instgenie.worker.v1 import worker_service_pb2 as wpb
from tests.services.mesh_helpers import wait_for
from tests.services.scheduler.test_discovery import NAMESPACE, SELECTOR, fake_api, pod  # noqa: F401 - fixture

from instgenie.services.common.server import read_ready_file


def kubeconfig(path, url: str) -> str:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "fake", "user": {"token": "not-a-real-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": NAMESPACE}}]}))
    return str(path)


@pytest.fixture
def scheduler(tmp_path, fake_api):  # noqa: F811 - the imported fixture
    ready = tmp_path / "scheduler.json"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "instgenie.services.scheduler", "--listen", "127.0.0.1:0", "--lease", "60",
         "--metrics-listen", "127.0.0.1:0", "--discover-workers", "--discover-selector", SELECTOR,
         "--discover-namespace", NAMESPACE, "--kubeconfig", kubeconfig(tmp_path / "kubeconfig", fake_api.url),
         "--ready-file", str(ready)],
        env={**env, "NO_PROXY": "*"}, stdout=open(tmp_path / "scheduler.log", "wb"), stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: (read_ready_file(ready) or {}).get("serving") or proc.poll() is not None, 60)
        info = read_ready_file(ready)
        assert info and info["serving"], (tmp_path / "scheduler.log").read_text()
        yield info
    finally:
        proc.terminate()
        proc.wait(20)


def workers_by_state(metrics_address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("instgenie_scheduler_workers{"):
            state = line.split('state="')[1].split('"')[0]
            out[state] = out.get(state, 0.0) + float(line.rsplit(" ", 1)[1])
    return {k: v for k, v in out.items() if v}


def register(stub, name: str) -> None:
    info = spb.WorkerInfo(worker_id=name, address="127.0.0.1:9", max_batch_size=4,
                          model=wpb.ModelInfo(model_id="m", width=16, height=16, default_steps=4, max_steps=50,
                                              image_tokens=64, scale_factor=2))
    stub.RegisterWorker(spb.RegisterWorkerRequest(worker=info, load=wpb.WorkerLoad()), timeout=5)


def test_a_worker_whose_pod_is_not_ready_gets_no_new_work_until_it_is_ready_again(scheduler, fake_api):  # noqa: F811
    metrics = scheduler["metrics"]
    assert metrics.startswith("127.0.0.1:") and not metrics.endswith(":0")
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    # latency histograms carry buckets up to 10 minutes (not OpenTelemetry's default 10 s)
    assert "instgenie_scheduler_in_flight" in text
    with grpc.insecure_channel(scheduler["address"]) as ch:
        stub = spb_grpc.SchedulerServiceStub(ch)
        register(stub, "worker-a")
        register(stub, "worker-b")
        fake_api.put(pod("worker-a", "10.0.0.1"))
        fake_api.put(pod("worker-b", "10.0.0.2"))
        assert wait_for(lambda: workers_by_state(metrics) == {"live": 2}, 15), workers_by_state(metrics)

        fake_api.put(pod("worker-a", "10.0.0.1", terminating=True))  # e.g. a node drain: the pod is terminating
        assert wait_for(lambda: workers_by_state(metrics) == {"live": 1, "unready": 1}, 15), workers_by_state(metrics)
        models = stub.ListModels(spb.ListModelsRequest(), timeout=5).models
        assert [m.workers for m in models] == [1]  # only worker-b takes work

        fake_api.put(pod("worker-a", "10.0.0.1"))  # ready again (e.g. a failing readiness probe recovered)
        assert wait_for(lambda: workers_by_state(metrics) == {"live": 2}, 15), workers_by_state(metrics)
        fake_api.delete("worker-b")
        assert wait_for(lambda: workers_by_state(metrics) == {"live": 1, "unready": 1}, 15)
