"""In-cluster worker discovery: list and watch worker pods by label, report ready and gone pods through callbacks.

Workers register themselves with the scheduler and push load reports; discovery only adds what the cluster
knows sooner than a lease can: that a pod is being deleted, was evicted or lost its node (`on_gone`, so the
scheduler can retire the worker at once), and that a new pod is up (`on_ready`, a hint only: the worker is
placed on once it has registered). It has no gRPC in it, and it holds no scheduler state.

    discovery = WorkerPodDiscovery.in_cluster("app.kubernetes.io/component=worker", on_ready, on_gone)
    discovery.start()            # a daemon thread: list, then watch; relist on 410 Gone and on watch errors
    ...
    discovery.stop()

The callbacks run on the discovery thread: an asyncio scheduler hands them over with
`loop.call_soon_threadsafe`. A callback that raises is logged and does not stop discovery.

A pod is *ready* when it is Running, has an IP, every container of its spec reports ready, and it is not
terminating (no deletionTimestamp). It is *gone* as soon as it stops being ready that way: deleted,
terminating (a draining worker still finishes its running edits; it just takes no new ones), failed, or a
container no longer ready. A pod replaced under the same name (a new uid, or a new address) is reported gone,
then ready again.

Tested against a fake Kubernetes API (an HTTP server in the test process; no real API server can be installed
on the development machines), `tests/services/scheduler/test_discovery.py`.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Callable

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

log = logging.getLogger(__name__)

#: where a pod finds its own namespace (mounted with the service-account token)
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
HTTP_GONE = 410

OnReady = Callable[[str, str], None]
OnGone = Callable[[str], None]


def pod_is_ready(pod: client.V1Pod) -> bool:
    """Running, with an IP, every container of its spec ready, and not terminating."""
    if pod.metadata is None or pod.metadata.deletion_timestamp is not None:
        return False
    status = pod.status
    if status is None or status.phase != "Running" or not status.pod_ip:
        return False
    expected = {c.name for c in (pod.spec.containers if pod.spec else [])}
    ready = {cs.name for cs in (status.container_statuses or []) if cs.ready}
    # A container that has not reported yet counts as not ready: an empty status list is never ready.
    return bool(expected) and expected <= ready


def pod_port(pod: client.V1Pod, port: int | str) -> int | None:
    """`port` itself when a number; else the containerPort of that name in the pod's spec (None when missing)."""
    if isinstance(port, int):
        return port
    for container in (pod.spec.containers if pod.spec else []):
        for p in container.ports or []:
            if p.name == port:
                return p.container_port
    return None


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class WorkerPodDiscovery:
    """Keeps the set of ready worker pods of one namespace and label selector; see the module docstring."""

    def __init__(self, api: client.CoreV1Api, namespace: str, label_selector: str, on_ready: OnReady,
                 on_gone: OnGone, *, port: int | str = "grpc", watch_seconds: int = 240,
                 request_timeout: float = 30.0, initial_backoff: float = 0.5, max_backoff: float = 30.0):
        self._api = api
        self.namespace = namespace
        self.label_selector = label_selector
        self._on_ready = on_ready
        self._on_gone = on_gone
        self._port = port
        #: the API server ends each watch after this long; watching again from the last resourceVersion is
        #: cheap, and a bounded watch means a silently dead connection is noticed within that time
        self._watch_seconds = watch_seconds
        self._request_timeout = request_timeout
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        #: ready pods: name -> (uid, address)
        self._ready: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread: threading.Thread | None = None
        #: set once the first list has been applied (the callbacks have seen the cluster's state)
        self.synced = threading.Event()
        #: how many times the pods were listed (the first list, then every relist)
        self.lists = 0

    @classmethod
    def in_cluster(cls, label_selector: str, on_ready: OnReady, on_gone: OnGone, *, namespace: str | None = None,
                   **kwargs) -> "WorkerPodDiscovery":
        """Inside a pod: the service account's credentials, and its own namespace unless one is given."""
        from kubernetes import config

        config.load_incluster_config()
        namespace = namespace or os.environ.get("POD_NAMESPACE") or NAMESPACE_FILE.read_text().strip()
        return cls(client.CoreV1Api(), namespace, label_selector, on_ready, on_gone, **kwargs)

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("discovery already started")
        self._thread = threading.Thread(target=self._run, name="worker-pod-discovery", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ends the watch (closing its connection) and waits for the thread; no callback runs afterwards."""
        self._stopping.set()
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            # Again and again: a watch that was about to open its connection at the first try is closed at
            # the next one (Watch.stop shuts the open connection's socket, which unblocks the read).
            current = self._watch
            if current is not None:
                current.stop()
            self._thread.join(0.05)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def ready(self) -> dict[str, str]:
        """The ready pods now: name -> address."""
        with self._lock:
            return {name: address for name, (_, address) in self._ready.items()}

    # -- the loop -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        resource_version: str | None = None
        failures = 0  # in a row; a watch that ends normally resets it
        while not self._stopping.is_set():
            try:
                if resource_version is None:
                    resource_version = self._relist()
                resource_version = self._watch_once(resource_version)
                failures = 0
            except ApiException as err:
                if self._stopping.is_set():
                    break
                resource_version = None
                failures += 1
                if err.status == HTTP_GONE and failures == 1:
                    # The resourceVersion is older than the API server keeps: events were lost, so only a
                    # fresh list tells what changed. Relist at once; back off only if that repeats.
                    log.info("worker pod watch expired (410 Gone); relisting")
                    continue
                log.warning("worker pod discovery: API error %s %s; relisting", err.status, err.reason)
                self._backoff(failures)
            except Exception as err:  # noqa: BLE001 - transport failures of every kind: relist after a pause
                if self._stopping.is_set():
                    break
                resource_version = None
                failures += 1
                log.warning("worker pod discovery: %s: %s; relisting", type(err).__name__, err)
                self._backoff(failures)

    def _backoff(self, failures: int) -> None:
        delay = min(self._max_backoff, self._initial_backoff * 2 ** (failures - 1))
        self._stopping.wait(delay * random.uniform(0.5, 1.0))

    def _relist(self) -> str:
        pods = self._api.list_namespaced_pod(self.namespace, label_selector=self.label_selector,
                                             _request_timeout=self._request_timeout)
        self.lists += 1
        current: dict[str, tuple[str, str]] = {}
        for pod in pods.items:
            entry = self._entry(pod)
            if entry is not None:
                current[pod.metadata.name] = entry
        with self._lock:
            known = dict(self._ready)
        for name in known.keys() - current.keys():
            self._gone(name)
        for name, entry in current.items():
            self._seen(name, entry)
        self.synced.set()
        return pods.metadata.resource_version

    def _watch_once(self, resource_version: str) -> str:
        """One bounded watch from `resource_version`; returns the resourceVersion to resume from."""
        self._watch = w = watch.Watch()
        try:
            stream = w.stream(self._api.list_namespaced_pod, self.namespace, label_selector=self.label_selector,
                              resource_version=resource_version, allow_watch_bookmarks=True,
                              timeout_seconds=self._watch_seconds,
                              _request_timeout=(self._request_timeout, self._watch_seconds + self._request_timeout))
            for event in stream:
                if self._stopping.is_set():
                    break
                kind, pod = event["type"], event["object"]
                if kind in ("ADDED", "MODIFIED"):
                    self._apply(pod)
                elif kind == "DELETED":
                    self._gone(pod.metadata.name)
                # BOOKMARK only moves the resourceVersion, which Watch tracks for every event.
        finally:
            self._watch = None
        return w.resource_version or resource_version

    # -- state changes --------------------------------------------------------------------------------------

    def _entry(self, pod: client.V1Pod) -> tuple[str, str] | None:
        if not pod_is_ready(pod):
            return None
        port = pod_port(pod, self._port)
        if port is None:
            log.warning("worker pod %s has no container port named %r; ignored", pod.metadata.name, self._port)
            return None
        return pod.metadata.uid or "", join_host_port(pod.status.pod_ip, port)

    def _apply(self, pod: client.V1Pod) -> None:
        entry = self._entry(pod)
        if entry is None:
            self._gone(pod.metadata.name)
        else:
            self._seen(pod.metadata.name, entry)

    def _seen(self, name: str, entry: tuple[str, str]) -> None:
        with self._lock:
            before = self._ready.get(name)
            if before == entry:
                return
        if before is not None:
            self._gone(name)  # the same name, another pod (or another address): the old one is gone
        with self._lock:
            self._ready[name] = entry
        self._call(self._on_ready, name, entry[1])

    def _gone(self, name: str) -> None:
        with self._lock:
            if self._ready.pop(name, None) is None:
                return
        self._call(self._on_gone, name)

    def _call(self, callback, *args) -> None:
        if self._stopping.is_set():
            return
        try:
            callback(*args)
        except Exception:  # noqa: BLE001 - a failing callback must not end discovery
            log.exception("worker pod discovery: callback %s%r failed", getattr(callback, "__name__", callback),
                          args)
