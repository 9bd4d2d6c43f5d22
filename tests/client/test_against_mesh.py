"""The SDK against the real mesh (not the scripted server): every call, typed errors, sync and asyncio."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from instgenie.client import AsyncClient, Client
from instgenie.client.errors import Cancelled, InvalidArgument, NotFound
from instgenie.client.types import Accepted, Progress, Result, Started
from tests.services.mesh_helpers import TENANTS, digit, half_mask


@pytest.fixture(scope="module")
def client(mesh):
    with Client(mesh.gateway.address, TENANTS["alpha"]) as c:
        yield c


@pytest.fixture(scope="module")
def template(client):
    seen = []
    t = client.create_template(digit(3), "3", name="sdk", progress=lambda op: seen.append(op.steps_done))
    assert t.state == "ready" and t.steps == 20 and seen and seen[-1] == 20
    return t


def test_edit_with_numpy_mask(client, template):
    result = client.edit(template.template_id, half_mask() > 0, "8", seed=2)
    image = np.asarray(result.pil())
    assert image.shape[:2] == (16, 16) and result.seed == 2 and 0 < result.mask_ratio < 1
    np.testing.assert_array_equal(image[:, :8], digit(3)[:, :8])


def test_stream_edit_events(client, template):
    events = list(client.stream_edit(template.template_id, half_mask(), "1", seed=3))
    assert isinstance(events[0], Accepted) and isinstance(events[-1], Result)
    assert any(isinstance(e, Started) for e in events)
    assert [e.step for e in events if isinstance(e, Progress)] == list(range(1, 21))


def test_cancel_and_typed_errors(client, mesh):
    slow = client.create_template(digit(5), "5", steps=200)
    stream = client.stream_edit(slow.template_id, half_mask(), "6", seed=1, request_id="sdk-cancel")
    for event in stream:
        if isinstance(event, Progress):
            break
    assert client.cancel_edit("sdk-cancel") == "cancelled"
    with pytest.raises(Cancelled):
        list(stream)
    with pytest.raises(NotFound):
        client.get_template("tpl-00000000000000000000")
    with pytest.raises(InvalidArgument) as err:
        client.edit(slow.template_id, np.zeros((16, 16), dtype=bool), "6")
    assert "mask" in [v.field for v in err.value.violations]
    client.delete_template(slow.template_id)
    with pytest.raises(NotFound):
        client.get_template(slow.template_id)


def test_listing_and_models(client, template):
    assert template.template_id in [t.template_id for t in client.iter_templates(page_size=1)]
    assert [m.name for m in client.list_models()] == ["digits-16px"]
    with Client(client.address, TENANTS["beta"]) as beta, pytest.raises(NotFound):
        beta.get_template(template.template_id)


def test_async_client(mesh, template):
    async def main():
        async with AsyncClient(mesh.gateway.address, TENANTS["alpha"]) as c:
            result = await c.edit(template.template_id, half_mask(), "9", seed=4)
            kinds = [type(e).__name__ async for e in c.stream_edit(template.template_id, half_mask(), "9", seed=5)]
            return result, kinds

    result, kinds = asyncio.run(main())
    assert result.seed == 4 and kinds[0] == "Accepted" and kinds[-1] == "Result"
