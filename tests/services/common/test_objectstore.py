"""Object stores: the local and the S3 backend pass the same contract tests, against a real S3 server."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from instgenie.services.common.objectstore import (LocalObjectStore, ObjectNotFound, S3ObjectStore,
                                                   StoreAccessDenied, StoreUnavailable, open_store)
from instgenie.services.common.testing_s3 import S3Server, S3ServerError, free_port


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalObjectStore(tmp_path / "store")
    return request.getfixturevalue("s3_store")


def test_round_trip_and_overwrite(store):
    store.put("templates/t1/step-0000.safetensors", b"\x00\x01payload")
    assert store.get("templates/t1/step-0000.safetensors") == b"\x00\x01payload"
    store.put("templates/t1/step-0000.safetensors", b"second")
    assert store.get("templates/t1/step-0000.safetensors") == b"second"
    store.put("empty", b"")
    assert store.get("empty") == b""
    assert store.exists("empty") and not store.exists("templates/t1")


def test_range_reads(store):
    store.put("r", bytes(range(100)))
    assert store.get_range("r", 10, 5) == bytes(range(10, 15))
    assert store.get_range("r", 95, 50) == bytes(range(95, 100))
    assert store.get_range("r", 200, 5) == b""


def test_metadata_size_and_etag(store):
    data = b"some shard bytes"
    store.put("m/obj", data, {"SHA256": "abc123", "model-id": "flux-tiny"})
    info = store.stat("m/obj")
    assert info.size == len(data)
    assert info.etag == hashlib.md5(data).hexdigest()  # single-part upload: the S3 etag is the MD5
    assert info.metadata == {"sha256": "abc123", "model-id": "flux-tiny"}
    store.put("m/obj", b"v2")  # a replaced object does not keep the old metadata
    assert store.stat("m/obj").metadata == {}


@pytest.mark.parametrize("metadata", [{"bad key": "v"}, {"k": "\u00e9"}, {"k": 3}])
def test_metadata_that_s3_cannot_carry_is_refused(store, metadata):
    with pytest.raises(ValueError):
        store.put("m/bad", b"x", metadata)


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "./a"])
def test_invalid_keys_are_refused(store, key):
    with pytest.raises(ValueError):
        store.put(key, b"x")


def test_list_by_prefix_is_a_string_prefix_and_sorted(store):
    for key in ["t/b/2", "t/a/1", "t/ab", "u/x", "t/a/0"]:
        store.put(key, b"x")
    assert list(store.list("t/a")) == ["t/a/0", "t/a/1", "t/ab"]
    assert list(store.list("t/a/")) == ["t/a/0", "t/a/1"]
    assert list(store.list("t/")) == ["t/a/0", "t/a/1", "t/ab", "t/b/2"]
    assert list(store.list("nothing/")) == []
    assert list(store.list()) == ["t/a/0", "t/a/1", "t/ab", "t/b/2", "u/x"]


def test_delete_and_delete_prefix(store):
    for key in ["t/1/a", "t/1/b", "t/2/a", "keep"]:
        store.put(key, b"x", {"k": "v"})
    store.delete("t/2/a")
    store.delete("t/2/a")  # deleting a missing key is not an error (S3 semantics)
    assert not store.exists("t/2/a")
    store.delete_prefix("t/1/")
    assert list(store.list()) == ["keep"]
    with pytest.raises(ValueError, match="non-empty prefix"):
        store.delete_prefix("")


def test_missing_keys_raise_object_not_found(store):
    for call in (lambda: store.get("no/such"), lambda: store.stat("no/such"), lambda: store.get_range("no/such", 0, 1)):
        with pytest.raises(ObjectNotFound) as info:
            call()
        assert isinstance(info.value, KeyError)  # engine code written against KeyError keeps working
        assert "no/such" in str(info.value)
    assert not store.exists("no/such")


def test_multipart_sized_object_round_trip(store):
    data = os.urandom(12 * 1024 * 1024)
    store.put("big/shard", data, {"sha256": hashlib.sha256(data).hexdigest()})
    assert store.get("big/shard") == data
    info = store.stat("big/shard")
    assert info.size == len(data) and info.metadata["sha256"] == hashlib.sha256(data).hexdigest()
    if isinstance(store, S3ObjectStore):
        assert info.etag.endswith("-2")  # two 8 MiB parts: it really went through multipart upload
    assert store.get_range("big/shard", 9 * 1024 * 1024, 1000) == data[9 * 1024 * 1024: 9 * 1024 * 1024 + 1000]


# -- S3 specifics -------------------------------------------------------------------------------------
def test_server_that_is_down_raises_store_unavailable_quickly(tmp_path):
    server = S3Server(tmp_path / "private").start()
    store = server.store("down-test")
    store.put("k", b"v")
    server.stop()
    operations = {"get": lambda: store.get("k"), "put": lambda: store.put("k2", b"v"),
                  "stat": lambda: store.stat("k"), "exists": lambda: store.exists("k"),
                  "list": lambda: list(store.list("")), "delete": lambda: store.delete("k")}
    for name, operation in operations.items():
        start = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            operation()
        assert time.monotonic() - start < 5, f"{name} took too long to fail"
        assert server.endpoint in str(info.value) and "down-test" in str(info.value)
    start = time.monotonic()
    with pytest.raises(StoreUnavailable, match="cannot reach"):
        S3ObjectStore(server.endpoint, "minioadmin", "minioadmin123", "other")  # create_bucket talks to it
    assert time.monotonic() - start < 5


def test_stalled_server_times_out_instead_of_hanging(tmp_path):
    server = S3Server(tmp_path / "stalled").start()
    store = server.store("stall-test", read_timeout=1.0)
    store.put("k", b"v")
    os.kill(server.process.pid, signal.SIGSTOP)  # the kernel still accepts connections; nothing answers
    try:
        assert _wait_stopped(server.process.pid), "gateway threads did not stop"
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match="stall-test/k"):
            store.get("k")
        assert time.monotonic() - start < 5  # one read timeout, not read_timeout x retries
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        server.stop()


def _wait_stopped(pid: int, timeout: float = 5.0) -> bool:
    """SIGSTOP takes effect asynchronously: wait until every thread of the process is stopped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        if all(state in "Tt" for state in states):
            return True
        time.sleep(0.01)
    return False


def test_wrong_credentials_raise_access_denied(s3_server):
    store = S3ObjectStore(s3_server.endpoint, s3_server.access_key, "not-the-secret", "any-bucket",
                          create_bucket=False)
    with pytest.raises(StoreAccessDenied, match="access and secret keys"):
        store.get("k")


def test_missing_bucket_without_create_is_reported(s3_server):
    store = s3_server.store("never-created", create_bucket=False)
    with pytest.raises(StoreUnavailable, match="does not exist"):
        store.get("k")


# -- open_store -----------------------------------------------------------------------------------------
def test_open_store_local_forms(tmp_path):
    by_url = open_store(f"file://{tmp_path}/a")
    by_path = open_store(tmp_path / "b")
    assert isinstance(by_url, LocalObjectStore) and by_url.root == (tmp_path / "a").resolve()
    assert isinstance(by_path, LocalObjectStore) and by_path.root == (tmp_path / "b").resolve()


def test_open_store_s3_url_and_env_credentials(s3_server, monkeypatch):
    store = open_store(s3_server.store_url("from-url"))
    store.put("k", b"v")
    monkeypatch.setenv("INSTGENIE_S3_ACCESS_KEY", s3_server.access_key)
    monkeypatch.setenv("INSTGENIE_S3_SECRET_KEY", s3_server.secret_key)
    same_bucket = open_store(f"s3://{s3_server.endpoint}/from-url")
    assert same_bucket.get("k") == b"v"
    assert s3_server.secret_key not in repr(store)


def test_open_store_rejects_bad_urls(monkeypatch):
    monkeypatch.delenv("INSTGENIE_S3_ACCESS_KEY", raising=False)
    monkeypatch.delenv("INSTGENIE_S3_SECRET_KEY", raising=False)
    with pytest.raises(ValueError, match="no credentials"):
        open_store("s3://127.0.0.1:9/bucket")
    with pytest.raises(ValueError, match="exactly one bucket") as info:
        open_store("s3://key:topsecret@127.0.0.1:9/")
    assert "topsecret" not in str(info.value)
    with pytest.raises(ValueError, match="scheme"):
        open_store("gs://bucket")


# -- the local S3 server itself ---------------------------------------------------------------------------
def test_server_command_line_start_and_stop(tmp_path):
    port = free_port()
    base = [sys.executable, "-m", "instgenie.services.common.testing_s3"]
    args = ["--dir", str(tmp_path / "cli"), "--port", str(port)]
    started = subprocess.run(base + ["start"] + args, capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr
    pid = int((tmp_path / "cli" / "gateway.pid").read_text())
    try:
        assert S3ObjectStore(f"127.0.0.1:{port}", "minioadmin", "minioadmin123", "cli-bucket").list("") is not None
        again = subprocess.run(base + ["start"] + args, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "already running" in again.stdout
    finally:
        stopped = subprocess.run(base + ["stop"] + args, capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert not (tmp_path / "cli" / "gateway.pid").exists()
    assert not _running(pid)


def _running(pid: int) -> bool:
    """Alive and not a zombie (the stopped gateway's parent, the CLI, has exited; init reaps it later)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_server_refuses_a_port_in_use(s3_server, tmp_path):
    with pytest.raises(S3ServerError, match="in use"):
        S3Server(tmp_path / "clash", port=s3_server.port).start()
