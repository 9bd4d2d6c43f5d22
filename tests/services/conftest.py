"""Service tests reuse the engine's seeded model fixtures, and share one real local mesh (S3 server, scheduler,
two digits workers, gateway, each its own process on an ephemeral loopback port) for the end-to-end tests."""
from __future__ import annotations

import pytest

from tests.engine.conftest import model_root, tiny_model  # noqa: F401 - re-exported fixtures

from .mesh_helpers import TENANTS, start_mesh


@pytest.fixture(scope="session")
def mesh(tmp_path_factory):
    """The whole system, started once per test session; tests must leave it as they found it."""
    m = start_mesh(tmp_path_factory.mktemp("mesh"))
    yield m
    m.stop()


@pytest.fixture(scope="session")
def tenants():
    return TENANTS
