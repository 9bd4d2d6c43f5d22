"""Worker pod discovery against a FAKE Kubernetes API: an HTTP server in this process on an ephemeral loopback
port that implements only what discovery calls (list and watch of pods in a namespace, equality label
selectors, resourceVersions, a chunked watch stream, 410 Gone for a compacted history). No real API server
installs on these machines (docs: environment.md), so this checks the client wiring and the relist logic, not
a real server's semantics beyond those."""
from __future__ import annotations

import copy
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from kubernetes import client

from instgenie.services.scheduler.discovery import WorkerPodDiscovery, pod_is_ready

NAMESPACE = "serving"
SELECTOR = "app.kubernetes.io/name=instgenie,app.kubernetes.io/component=worker"
WORKER_LABELS = {"app.kubernetes.io/name": "instgenie", "app.kubernetes.io/component": "worker"}


def pod(name: str, ip: str = "10.0.0.1", *, ready: bool = True, phase: str = "Running", uid: str | None = None,
        labels: dict | None = None, namespace: str = NAMESPACE, terminating: bool = False,
        containers: tuple[str, ...] = ("worker",), port: int = 50053) -> dict:
    """A pod as the API server returns it (the fields discovery reads, and those the client requires)."""
    meta = {"name": name, "namespace": namespace, "uid": uid or f"uid-{name}",
            "labels": dict(WORKER_LABELS if labels is None else labels)}
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    spec = {"containers": [{"name": c, "image": "instgenie-worker",
                            "ports": [{"name": "grpc", "containerPort": port}]} for c in containers]}
    statuses = [{"name": c, "ready": ready, "restartCount": 0, "image": "instgenie-worker", "imageID": ""}
                for c in containers]
    status = {"phase": phase, "podIP": ip if phase == "Running" else None, "containerStatuses": statuses}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}


class FakeKubeAPI:
    """The fake API's state and controls; `Handler` serves it."""

    def __init__(self):
        self.cond = threading.Condition()
        self.pods: dict[tuple[str, str], dict] = {}
        self.rv = 100
        self.events: list[tuple[int, str, dict]] = []  # (resourceVersion, type, pod)
        self.oldest = 0  # watches from an older resourceVersion get 410 Gone (history compacted)
        self.generation = 0  # bumped to end every open watch
        self.end_with: str = "close"  # how ended watches end: "close" (clean), "gone" (410 event), "drop"
        self.fail_next: list[int] = []  # HTTP statuses for the next requests
        self.requests: list[dict] = []
        self.closing = False

    # -- controls used by the tests ---------------------------------------------------------------------------

    def put(self, obj: dict, *, silently: bool = False) -> None:
        """Create or replace a pod; an event unless `silently` (lost to compaction, see `expire`)."""
        with self.cond:
            self.rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self.rv)
            key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
            kind = "MODIFIED" if key in self.pods else "ADDED"
            self.pods[key] = obj
            if not silently:
                self.events.append((self.rv, kind, obj))
            self.cond.notify_all()

    def delete(self, name: str, namespace: str = NAMESPACE, *, silently: bool = False) -> None:
        with self.cond:
            self.rv += 1
            obj = self.pods.pop((namespace, name))
            obj["metadata"]["resourceVersion"] = str(self.rv)
            if not silently:
                self.events.append((self.rv, "DELETED", obj))
            self.cond.notify_all()

    def expire(self) -> None:
        """Compact the history and end open watches with an ERROR 410 event, as an API server does."""
        with self.cond:
            self.oldest = self.rv
            self.end_with = "gone"
            self.generation += 1
            self.cond.notify_all()

    def drop_watches(self) -> None:
        """Cut open watch connections mid-stream (no final chunk): a network failure."""
        with self.cond:
            self.end_with = "drop"
            self.generation += 1
            self.cond.notify_all()

    def count(self, watch: bool) -> int:
        with self.cond:
            return sum(1 for r in self.requests if r["watch"] == watch)

    # -- serving ---------------------------------------------------------------------------------------------

    def matching(self, obj: dict, namespace: str, selector: str) -> bool:
        if obj["metadata"]["namespace"] != namespace:
            return False
        labels = obj["metadata"].get("labels") or {}
        for term in filter(None, selector.split(",")):
            key, _, value = term.partition("=")
            if labels.get(key) != value:
                return False
        return True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    api: FakeKubeAPI

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        url = urlparse(self.path)
        parts = url.path.strip("/").split("/")
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        api = self.api
        if len(parts) != 5 or parts[:3] != ["api", "v1", "namespaces"] or parts[4] != "pods":
            return self._json(404, {"kind": "Status", "code": 404, "reason": "NotFound", "message": url.path})
        namespace, selector = parts[3], query.get("labelSelector", "")
        is_watch = query.get("watch") == "true"
        with api.cond:
            api.requests.append({"watch": is_watch, "resourceVersion": query.get("resourceVersion")})
            generation = api.generation  # a drop from now on cuts this watch, even before its headers are out
            if api.fail_next:
                code = api.fail_next.pop(0)
                return self._json(code, {"kind": "Status", "code": code, "reason": "InternalError",
                                         "message": "injected failure"})
            if not is_watch:
                items = [p for p in api.pods.values() if api.matching(p, namespace, selector)]
                return self._json(200, {"kind": "PodList", "apiVersion": "v1",
                                        "metadata": {"resourceVersion": str(api.rv)}, "items": items})
        self._watch(namespace, selector, int(query.get("resourceVersion") or 0),
                    float(query.get("timeoutSeconds") or 60), generation)

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, event: dict) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, namespace: str, selector: str, since: int, timeout: float, generation: int) -> None:
        api = self.api
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        end = time.monotonic() + timeout
        with api.cond:
            if since < api.oldest:
                self._chunk(self._gone())
                return self._finish()
            sent = since
            while True:
                for rv, kind, obj in api.events:
                    if rv > sent and api.matching(obj, namespace, selector):
                        self._chunk({"type": kind, "object": obj})
                    sent = max(sent, rv)
                if api.closing or time.monotonic() >= end:
                    return self._finish()
                if api.generation != generation:
                    if api.end_with == "drop":
                        self.close_connection = True
                        return  # no terminating chunk: the client sees a broken stream
                    if api.end_with == "gone":
                        self._chunk(self._gone())
                    return self._finish()
                api.cond.wait(min(0.2, max(0.0, end - time.monotonic())))

    @staticmethod
    def _gone() -> dict:
        return {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                            "message": "too old resource version", "reason": "Expired",
                                            "code": 410}}

    def _finish(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


@pytest.fixture
def fake_api():
    api = FakeKubeAPI()
    handler = type("BoundHandler", (Handler,), {"api": api})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield api
    finally:
        with api.cond:
            api.closing = True
            api.cond.notify_all()
        server.shutdown()
        server.server_close()
        thread.join(5)


class Recorder:
    """The callbacks, in order: ("ready", name, address) and ("gone", name)."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.lock = threading.Lock()

    def on_ready(self, name: str, address: str) -> None:
        with self.lock:
            self.calls.append(("ready", name, address))

    def on_gone(self, name: str) -> None:
        with self.lock:
            self.calls.append(("gone", name))

    def snapshot(self) -> list[tuple]:
        with self.lock:
            return list(self.calls)

    def wait_for(self, *expected: tuple, timeout: float = 10.0) -> list[tuple]:
        """Waits until the calls so far end with `expected` (in that order) and returns all calls."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            calls = self.snapshot()
            if calls[len(calls) - len(expected):] == list(expected):
                return calls
            time.sleep(0.02)
        raise AssertionError(f"expected the calls to end with {list(expected)}, got {self.snapshot()}")


@pytest.fixture
def start(fake_api):
    started: list[WorkerPodDiscovery] = []

    def _start(recorder: Recorder, **kwargs) -> WorkerPodDiscovery:
        config = client.Configuration(host=fake_api.url, no_proxy="*")  # loopback only, whatever the env says
        kwargs.setdefault("watch_seconds", 30)
        kwargs.setdefault("initial_backoff", 0.05)
        kwargs.setdefault("max_backoff", 0.2)
        d = WorkerPodDiscovery(client.CoreV1Api(client.ApiClient(config)), NAMESPACE, SELECTOR,
                               recorder.on_ready, recorder.on_gone, **kwargs)
        d.start()
        started.append(d)
        assert d.synced.wait(10), "the first list never completed"
        return d

    yield _start
    for d in started:
        d.stop()
        assert not d.running, "discovery thread still running after stop()"


def test_first_list_reports_only_ready_worker_pods(fake_api, start):
    fake_api.put(pod("w-ready", "10.0.0.1"))
    fake_api.put(pod("w-unready", "10.0.0.2", ready=False))
    fake_api.put(pod("w-pending", phase="Pending"))
    fake_api.put(pod("w-terminating", "10.0.0.3", terminating=True))
    fake_api.put(pod("w-half", "10.0.0.4", containers=("worker", "sidecar")) | {"status": {
        "phase": "Running", "podIP": "10.0.0.4",
        "containerStatuses": [{"name": "worker", "ready": True, "restartCount": 0, "image": "", "imageID": ""}]}})
    fake_api.put(pod("gateway-1", "10.0.0.5", labels={"app.kubernetes.io/name": "instgenie",
                                                      "app.kubernetes.io/component": "gateway"}))
    fake_api.put(pod("w-elsewhere", "10.0.0.6", namespace="other"))
    rec = Recorder()
    d = start(rec)
    assert rec.snapshot() == [("ready", "w-ready", "10.0.0.1:50053")]
    assert d.ready() == {"w-ready": "10.0.0.1:50053"}


def test_watch_reports_pods_becoming_ready_terminating_and_deleted(fake_api, start):
    fake_api.put(pod("w-1", "10.0.0.1", ready=False))
    rec = Recorder()
    d = start(rec)
    assert rec.snapshot() == []
    fake_api.put(pod("w-1", "10.0.0.1"))
    rec.wait_for(("ready", "w-1", "10.0.0.1:50053"))
    fake_api.put(pod("w-2", "fd00::7", port=6000))
    rec.wait_for(("ready", "w-2", "[fd00::7]:6000"))
    fake_api.put(pod("w-1", "10.0.0.1", terminating=True))  # draining: no new work
    rec.wait_for(("gone", "w-1"))
    fake_api.delete("w-1")  # already gone: no second call
    fake_api.put(pod("w-2", "fd00::7", port=6000, ready=False))
    calls = rec.wait_for(("gone", "w-2"))
    assert calls == [("ready", "w-1", "10.0.0.1:50053"), ("ready", "w-2", "[fd00::7]:6000"), ("gone", "w-1"),
                     ("gone", "w-2")]
    assert d.ready() == {}
    assert fake_api.count(watch=False) == 1, "a healthy watch must not relist"


def test_a_pod_replaced_under_the_same_name_is_gone_then_ready(fake_api, start):
    fake_api.put(pod("w-0", "10.0.0.1", uid="a"))
    rec = Recorder()
    start(rec)
    fake_api.delete("w-0", silently=True)
    fake_api.put(pod("w-0", "10.0.0.9", uid="b"))  # a StatefulSet-style replacement, seen only as ADDED
    rec.wait_for(("gone", "w-0"), ("ready", "w-0", "10.0.0.9:50053"))


def test_410_gone_relists_and_catches_up_on_changes_lost_to_compaction(fake_api, start):
    fake_api.put(pod("w-1", "10.0.0.1"))
    fake_api.put(pod("w-2", "10.0.0.2"))
    rec = Recorder()
    d = start(rec)
    rec.wait_for(("ready", "w-2", "10.0.0.2:50053"))
    # These changes produce no watch event (compacted away): only a relist can find them.
    fake_api.delete("w-1", silently=True)
    fake_api.put(pod("w-3", "10.0.0.3"), silently=True)
    time.sleep(0.3)
    assert rec.snapshot()[-1] == ("ready", "w-2", "10.0.0.2:50053"), "nothing can be seen before the relist"
    fake_api.expire()
    calls = rec.wait_for(("gone", "w-1"), ("ready", "w-3", "10.0.0.3:50053"))
    assert calls.count(("ready", "w-2", "10.0.0.2:50053")) == 1, "an unchanged pod is not reported again"
    assert d.ready() == {"w-2": "10.0.0.2:50053", "w-3": "10.0.0.3:50053"}
    assert d.lists == 2
    # The watch resumes from the relist: a later change arrives as an event again.
    fake_api.put(pod("w-4", "10.0.0.4"))
    rec.wait_for(("ready", "w-4", "10.0.0.4:50053"))
    assert d.lists == 2


def test_a_broken_watch_and_failing_requests_are_retried_with_a_relist(fake_api, start):
    fake_api.put(pod("w-1", "10.0.0.1"))
    rec = Recorder()
    d = start(rec)
    rec.wait_for(("ready", "w-1", "10.0.0.1:50053"))
    deadline = time.monotonic() + 10
    while fake_api.count(watch=True) < 1 and time.monotonic() < deadline:  # the watch is open: a drop cuts it
        time.sleep(0.01)
    fake_api.delete("w-1", silently=True)
    fake_api.fail_next = [500, 503]  # the next two relists fail too
    fake_api.drop_watches()
    rec.wait_for(("gone", "w-1"))
    assert d.lists >= 2 and d.running
    fake_api.put(pod("w-2", "10.0.0.2"))
    rec.wait_for(("ready", "w-2", "10.0.0.2:50053"))


def test_the_watch_resumes_from_its_last_resource_version_when_the_server_ends_it(fake_api, start):
    rec = Recorder()
    d = start(rec, watch_seconds=1)
    fake_api.put(pod("w-1", "10.0.0.1"))
    rec.wait_for(("ready", "w-1", "10.0.0.1:50053"))
    time.sleep(1.5)  # the server ends the watch after timeoutSeconds; the next one starts where it ended
    fake_api.put(pod("w-2", "10.0.0.2"))
    rec.wait_for(("ready", "w-2", "10.0.0.2:50053"))
    assert d.lists == 1 and fake_api.count(watch=True) >= 2
    resumed = [r["resourceVersion"] for r in fake_api.requests if r["watch"]]
    assert resumed[1] != resumed[0], "the second watch must resume after the events already seen"


def test_a_failing_callback_does_not_stop_discovery(fake_api):
    rec = Recorder()
    seen = []

    def on_ready(name, address):
        seen.append(name)
        if name == "w-1":
            raise RuntimeError("scheduler hiccup")
        rec.on_ready(name, address)

    config = client.Configuration(host=fake_api.url, no_proxy="*")
    d = WorkerPodDiscovery(client.CoreV1Api(client.ApiClient(config)), NAMESPACE, SELECTOR, on_ready, rec.on_gone)
    d.start()
    try:
        assert d.synced.wait(10)
        fake_api.put(pod("w-1", "10.0.0.1"))
        fake_api.put(pod("w-2", "10.0.0.2"))
        rec.wait_for(("ready", "w-2", "10.0.0.2:50053"))
        assert seen == ["w-1", "w-2"]
    finally:
        d.stop()
    assert not d.running


def test_stop_ends_an_idle_watch_promptly_and_no_callback_follows(fake_api, start):
    rec = Recorder()
    d = start(rec, watch_seconds=120)
    time.sleep(0.2)  # the watch is open and idle
    began = time.monotonic()
    d.stop()
    assert not d.running and time.monotonic() - began < 3
    fake_api.put(pod("w-1", "10.0.0.1"))
    time.sleep(0.2)
    assert rec.snapshot() == []


def test_pod_is_ready_needs_every_container_of_the_spec():
    api = client.ApiClient()

    def model(obj):
        return api.deserialize(json.dumps(obj), "V1Pod", "application/json")

    assert pod_is_ready(model(pod("a")))
    assert not pod_is_ready(model(pod("a", ready=False)))
    assert not pod_is_ready(model(pod("a", terminating=True)))
    assert not pod_is_ready(model(pod("a", phase="Succeeded")))
    no_status = pod("a")
    no_status["status"]["containerStatuses"] = []
    assert not pod_is_ready(model(no_status))
