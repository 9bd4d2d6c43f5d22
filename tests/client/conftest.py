"""Fixtures for SDK tests: a scripted EditService on loopback, a client for it, and recorded backoff sleeps."""
from __future__ import annotations

import pytest

from instgenie.client import Client, aio, sync
from tests.client.scripted_server import ScriptedEditService, serving

API_KEY = "key-tenant-a"


@pytest.fixture()
def service() -> ScriptedEditService:
    return ScriptedEditService(api_key=API_KEY)


@pytest.fixture()
def address(service):
    with serving(service) as address:
        yield address


@pytest.fixture()
def sleeps(monkeypatch) -> list[float]:
    """The backoff waits the clients asked for, recorded instead of slept, so retry tests take no time."""
    recorded: list[float] = []

    async def no_wait(seconds):
        recorded.append(seconds)

    monkeypatch.setattr(sync, "_sleep", recorded.append)
    monkeypatch.setattr(aio, "_sleep", no_wait)
    return recorded


@pytest.fixture()
def client(address, sleeps):
    with Client(address, api_key=API_KEY) as client:
        yield client
