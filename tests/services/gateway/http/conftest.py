"""Fixtures for the HTTP front: the shared mesh's HTTP base URL and real `openai` clients per tenant."""
from __future__ import annotations

import pytest

from tests.services.mesh_helpers import TENANTS


@pytest.fixture(scope="session")
def http_url(mesh) -> str:
    assert mesh.http_url.startswith("http://127.0.0.1:"), "the local mesh starts the gateway's HTTP front"
    return mesh.http_url


@pytest.fixture()
def openai_client(http_url):
    """The real `openai` package, pointed at the gateway (no retries: a test sees every answer)."""
    import openai

    with openai.OpenAI(base_url=http_url + "/v1", api_key=TENANTS["alpha"], max_retries=0, timeout=120) as client:
        yield client
