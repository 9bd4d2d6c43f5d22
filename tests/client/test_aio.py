"""The AsyncClient against a scripted EditService: the same contract as the sync client, over grpc.aio."""
from __future__ import annotations

import asyncio
import threading
from contextlib import aclosing

import grpc
import pytest

from instgenie.client import (Accepted, AsyncClient, Keepalive, Operation, Progress, Queued, Result, Started,
                              Template)
from instgenie.client import errors
from instgenie.gateway.v1 import edit_service_pb2 as pb
from instgenie.status import StatusInfo
from tests.client.conftest import API_KEY
from tests.client.scripted_server import (Fail, Stream, at_most, echo_request_id, edit_events, edit_result,
                                          invalid_argument, operation, png, template, unavailable)

MASK = png(16, 16, (255, 255, 255))


def run(address, scenario, **options):
    """Runs `scenario(client)` on a fresh event loop with an AsyncClient made inside it."""
    async def main():
        async with AsyncClient(address, API_KEY, **options) as client:
            return await scenario(client)
    return asyncio.run(main())


def test_edit_retries_unavailable_with_the_same_request_id(address, service, sleeps):
    service.script("Edit", unavailable(), unavailable(),
                   echo_request_id(lambda rid: pb.EditResponse(result=edit_result(rid))))
    result = run(address, lambda c: c.edit("tpl-1", MASK, "8"))
    seen = service.calls("Edit")
    assert len(seen) == 3 and len({s.request.request_id for s in seen}) == 1
    assert result.request_id == seen[0].request.request_id
    assert all(s.metadata["authorization"] == f"Bearer {API_KEY}" for s in seen)
    assert all(s.time_remaining is not None and at_most(30.0) < s.time_remaining <= at_most(300.0) for s in seen)
    assert len(sleeps) == 2 and 0.125 <= sleeps[0] <= 0.25 and 0.25 <= sleeps[1] <= 0.5


def test_create_without_request_id_is_not_retried(address, service, sleeps):
    service.script("CreateTemplate", unavailable(), pb.CreateTemplateResponse(operation=operation()))
    with pytest.raises(errors.Unavailable):
        run(address, lambda c: c.create_template(png(), "3", wait=False))
    assert len(service.calls("CreateTemplate")) == 1 and sleeps == []


def test_non_unavailable_errors_are_typed_and_not_retried(address, service, sleeps):
    service.script("GetTemplate", invalid_argument("template_id", "must not be empty"))
    with pytest.raises(errors.InvalidArgument) as caught:
        run(address, lambda c: c.get_template(""))
    assert caught.value.violations[0].field == "template_id" and sleeps == []
    assert service.calls("GetTemplate")[0].time_remaining <= at_most(30.0)


def test_resource_exhausted_retry_is_opt_in(address, service, sleeps):
    busy = Fail(grpc.StatusCode.RESOURCE_EXHAUSTED, "full",
                StatusInfo(grpc.StatusCode.RESOURCE_EXHAUSTED, "", retry_after=1.0), via_status=True)
    service.script("ListModels", busy, pb.ListModelsResponse())
    assert run(address, lambda c: c.list_models(), retry_resource_exhausted=True) == []
    assert len(sleeps) == 1 and sleeps[0] >= 1.0
    service.script("ListModels", busy)
    with pytest.raises(errors.ResourceExhausted):
        run(address, lambda c: c.list_models())
    assert len(sleeps) == 1


def test_create_template_waits_with_progress(address, service):
    service.script("CreateTemplate", pb.CreateTemplateResponse(operation=operation()))
    service.script("WatchOperation", Stream([pb.WatchOperationResponse(operation=op) for op in (
        operation(steps_done=2), operation(steps_done=4, done=True, response=template()))]))
    seen: list[Operation] = []
    result = run(address, lambda c: c.create_template(png(), "3", request_id="reg-1", progress=seen.append))
    assert isinstance(result, Template) and result.template_id == "tpl-1"
    assert [op.steps_done for op in seen] == [0, 2, 4]
    assert service.calls("CreateTemplate")[0].request.request_id == "reg-1"
    assert at_most(300.0) < service.calls("WatchOperation")[0].time_remaining <= at_most(1800.0)


def test_create_template_raises_the_operations_error(address, service):
    failure = StatusInfo(grpc.StatusCode.DATA_LOSS, "cache upload corrupt")
    service.script("CreateTemplate", pb.CreateTemplateResponse(operation=operation(done=True, error=failure)))
    with pytest.raises(errors.DataLoss, match="cache upload corrupt"):
        run(address, lambda c: c.create_template(png(), "3"))


def test_stream_edit_events_and_reattach(address, service, sleeps):
    events = edit_events("r-1", steps=2)
    service.script("StreamEdit", Stream(events[:3], then=unavailable()), Stream(events))

    async def scenario(client):
        return [event async for event in client.stream_edit("tpl-1", MASK, "8", request_id="r-1")]

    got = run(address, scenario)
    assert [type(e) for e in got[3:]] == [Accepted, Queued, Keepalive, Started, Progress, Progress, Result]
    assert got[-1].result.request_id == "r-1" and len(sleeps) == 1
    assert [s.request.edit.request_id for s in service.calls("StreamEdit")] == ["r-1", "r-1"]


def test_stream_edit_failure_is_typed(address, service):
    service.script("StreamEdit", Stream(edit_events("r-1")[:1], then=Fail(grpc.StatusCode.CANCELLED, "cancelled")))

    async def scenario(client):
        got = []
        with pytest.raises(errors.Cancelled):
            async for event in client.stream_edit("tpl-1", MASK, "8"):
                got.append(event)
        return got

    assert [type(e) for e in run(address, scenario)] == [Accepted]


def test_leaving_a_stream_edit_early_cancels_the_call(address, service):
    release = threading.Event()
    service.script("StreamEdit", Stream(edit_events("r-1")[:2], hold=release))

    async def scenario(client):
        async with aclosing(client.stream_edit("tpl-1", MASK, "8")) as events:
            async for event in events:
                return event

    try:
        assert isinstance(run(address, scenario), Accepted)
        assert service.cancelled["StreamEdit"].wait(timeout=10), "the server never saw the cancellation"
    finally:
        release.set()


def test_iter_templates_and_delete(address, service, sleeps):
    service.script("ListTemplates",
                   pb.ListTemplatesResponse(templates=[template("a")], next_page_token="p2"),
                   pb.ListTemplatesResponse(templates=[template("b")]))
    service.script("DeleteTemplate", unavailable(), Fail(grpc.StatusCode.NOT_FOUND, "gone"))

    async def scenario(client):
        ids = [t.template_id async for t in client.iter_templates(page_size=1)]
        await client.delete_template("a")
        return ids

    assert run(address, scenario) == ["a", "b"]
    assert [s.request.page_token for s in service.calls("ListTemplates")] == ["", "p2"]
    assert len(service.calls("DeleteTemplate")) == 2


def test_operations_models_and_cancel(address, service):
    service.script("GetOperation", pb.GetOperationResponse(operation=operation(steps_done=1)))
    service.script("WaitOperation", pb.WaitOperationResponse(operation=operation(done=True, response=template())))
    service.script("ListModels", pb.ListModelsResponse(models=[pb.Model(name="digits", width=16, height=16)]))
    service.script("CancelEdit", pb.CancelEditResponse(outcome=pb.CANCEL_OUTCOME_ALREADY_FINISHED))

    async def scenario(client):
        return (await client.get_operation("tpl-1"), await client.wait_operation("tpl-1", timeout=20),
                await client.list_models(), await client.cancel_edit("r-1"))

    current, finished, models, outcome = run(address, scenario)
    assert (current.steps_done, current.done) == (1, False)
    assert finished.done and finished.template.template_id == "tpl-1"
    assert service.calls("WaitOperation")[0].request.timeout.seconds == 20
    assert [m.name for m in models] == ["digits"] and outcome == "already_finished"


def test_client_built_outside_the_event_loop(address, service):
    # The channel opens on the first call, inside the loop that makes it; building the client earlier is fine.
    client = AsyncClient(address, API_KEY)
    service.script("ListModels", pb.ListModelsResponse())

    async def main():
        async with client:
            return await client.list_models()

    assert asyncio.run(main()) == []
