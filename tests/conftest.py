"""Fixtures shared by every test package: a real S3 server (JuiceFS gateway) on loopback, fresh buckets on it,
and one real local mesh (S3 server, scheduler, two digits workers, gateway; each its own process on an ephemeral
loopback port) for the end-to-end tests."""
from __future__ import annotations

import uuid

import pytest

from instgenie.services.common.testing_s3 import S3Server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One gateway for the whole session (about a second to start); its data lives in a pytest temp dir."""
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture()
def s3_store(s3_server):
    """An S3ObjectStore on a bucket no other test uses."""
    store = s3_server.store(f"test-{uuid.uuid4().hex[:16]}")
    yield store
    store.close()


@pytest.fixture(scope="session")
def mesh(tmp_path_factory):
    """The whole system, started once per test session; tests must leave it as they found it."""
    from tests.services.mesh_helpers import start_mesh

    m = start_mesh(tmp_path_factory.mktemp("mesh"))
    yield m
    m.stop()


def _processes_mentioning(marker: str) -> list[tuple[int, str]]:
    import os
    from pathlib import Path

    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd and int(pid) != os.getpid():
            found.append((int(pid), cmd[:160]))
    return found


def pytest_sessionfinish(session, exitstatus):
    """No test may leave a process behind: every server a test starts keeps its files under pytest's temp dir,
    so any process still naming that dir at the end was leaked. They are reported, killed, and fail the run."""
    import os
    import signal

    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    leaked = _processes_mentioning(str(factory.getbasetemp()))
    if leaked:
        for pid, cmd in leaked:
            print(f"\nleaked process {pid}: {cmd}")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        session.exitstatus = 1
