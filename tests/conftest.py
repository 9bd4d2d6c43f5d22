"""Fixtures shared by every test package: a real S3 server (JuiceFS gateway) on loopback, and fresh buckets on it."""
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
