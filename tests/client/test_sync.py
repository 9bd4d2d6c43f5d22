"""The sync Client against a scripted EditService: requests it builds, deadlines, retries, typed results, streams."""
from __future__ import annotations

import threading

import grpc
import pytest
from PIL import Image

from instgenie.client import (Accepted, CacheMode, CancelOutcome, Client, EditResult, Keepalive, Operation,
                              Progress, Queued, Result, Started, Template, TemplateState)
from instgenie.client import errors
from instgenie.gateway.v1 import edit_service_pb2 as pb
from instgenie.status import StatusInfo
from tests.client.conftest import API_KEY
from tests.client.scripted_server import (Fail, Stream, at_most, echo_request_id, edit_events, edit_result,
                                          invalid_argument, operation, png, template, unavailable)

MASK = png(16, 16, (255, 255, 255))


def created(template_id="tpl-1"):
    return pb.CreateTemplateResponse(operation=operation(template_id))


def watched(*ops):
    return Stream([pb.WatchOperationResponse(operation=op) for op in ops])


# -- metadata and deadlines --------------------------------------------------------------------------------------

def test_every_call_carries_the_bearer_key_and_a_deadline(service, client):
    service.script("GetOperation", pb.GetOperationResponse(operation=operation()))
    service.script("GetTemplate", pb.GetTemplateResponse(template=template()))
    service.script("ListTemplates", pb.ListTemplatesResponse())
    service.script("DeleteTemplate", pb.DeleteTemplateResponse())
    service.script("CancelEdit", pb.CancelEditResponse(outcome=pb.CANCEL_OUTCOME_CANCELLED))
    service.script("ListModels", pb.ListModelsResponse())
    service.script("CreateTemplate", created())
    service.script("WaitOperation", pb.WaitOperationResponse(operation=operation(done=True)))
    service.script("Edit", echo_request_id(lambda rid: pb.EditResponse(result=edit_result(rid))))
    service.script("StreamEdit", echo_request_id(lambda rid: Stream(edit_events(rid))))
    service.script("WatchOperation", watched(operation(done=True, response=template())))
    client.get_operation("tpl-1")
    client.get_template("tpl-1")
    client.list_templates()
    client.delete_template("tpl-1")
    client.cancel_edit("r-1")
    client.list_models()
    client.create_template(png(), "3", wait=False)
    client.wait_operation("tpl-1", timeout=60)
    client.edit("tpl-1", MASK, "8")
    list(client.stream_edit("tpl-1", MASK, "8"))
    list(client.watch_operation("tpl-1"))
    assert len(service.seen) == 11
    for seen in service.seen:
        assert seen.metadata["authorization"] == f"Bearer {API_KEY}", seen.method
        assert seen.time_remaining is not None, seen.method
    budget = {s.method: s.time_remaining for s in service.seen}
    for method in ("GetOperation", "GetTemplate", "ListTemplates", "DeleteTemplate", "CancelEdit", "ListModels",
                   "CreateTemplate"):
        assert budget[method] <= at_most(30.0), method
    assert at_most(30.0) < budget["Edit"] <= at_most(300.0)
    assert at_most(30.0) < budget["StreamEdit"] <= at_most(300.0)
    assert at_most(300.0) < budget["WatchOperation"] <= at_most(1800.0)
    assert at_most(30.0) < budget["WaitOperation"] <= at_most(65.0)  # the wait plus a little grace for the answer


def test_per_call_timeout_and_client_defaults(address, service, sleeps):
    service.script("ListModels", pb.ListModelsResponse(), pb.ListModelsResponse())
    service.script("Edit", pb.EditResponse(result=edit_result()))
    with Client(address, API_KEY, timeout=4.0, edit_timeout=9.0) as client:
        client.list_models()
        client.list_models(timeout=2.0)
        client.edit("tpl-1", MASK, "8")
    first, second = service.calls("ListModels")
    assert at_most(2.0) < first.time_remaining <= at_most(4.0) and second.time_remaining <= at_most(2.0)
    assert at_most(4.0) < service.calls("Edit")[0].time_remaining <= at_most(9.0)


def test_wait_operation_sends_its_timeout(service, client):
    service.script("WaitOperation", pb.WaitOperationResponse(operation=operation(steps_done=2)))
    op = client.wait_operation("operations/tpl-1", timeout=12.5)
    request = service.calls("WaitOperation")[0].request
    assert request.name == "operations/tpl-1" and request.timeout.ToNanoseconds() == 12_500_000_000
    assert (op.done, op.steps_done, op.total_steps) == (False, 2, 4)


# -- retries -----------------------------------------------------------------------------------------------------

def test_edit_retries_unavailable_with_the_same_request_id(service, client, sleeps):
    service.script("Edit", unavailable(), unavailable(),
                   echo_request_id(lambda rid: pb.EditResponse(result=edit_result(rid))))
    result = client.edit("tpl-1", MASK, "8")
    ids = [s.request.request_id for s in service.calls("Edit")]
    assert len(ids) == 3 and len(set(ids)) == 1 and ids[0].startswith("sdk-")
    assert result.request_id == ids[0]
    assert len(sleeps) == 2
    assert 0.125 <= sleeps[0] <= 0.25 and 0.25 <= sleeps[1] <= 0.5  # exponential, jittered


def test_each_edit_gets_a_fresh_request_id_unless_given(service, client):
    service.script("Edit", *[pb.EditResponse(result=edit_result())] * 3)
    client.edit("tpl-1", MASK, "8")
    client.edit("tpl-1", MASK, "8")
    client.edit("tpl-1", MASK, "8", request_id="mine-1")
    ids = [s.request.request_id for s in service.calls("Edit")]
    assert ids[0] != ids[1] and ids[2] == "mine-1"


def test_retries_give_up_after_max_retries(address, service, sleeps):
    service.script("GetTemplate", *[unavailable()] * 4)
    with Client(address, API_KEY, max_retries=3) as client:
        with pytest.raises(errors.Unavailable) as caught:
            client.get_template("tpl-1")
    assert len(service.calls("GetTemplate")) == 4 and len(sleeps) == 3
    assert caught.value.attempts == 4 and "after 4 attempts" in str(caught.value)


def test_no_retry_when_the_backoff_would_pass_the_deadline(address, service, sleeps):
    service.script("GetTemplate", unavailable())
    with Client(address, API_KEY, initial_backoff=60.0, max_backoff=60.0) as client:
        with pytest.raises(errors.Unavailable):
            client.get_template("tpl-1", timeout=5.0)
    assert len(service.calls("GetTemplate")) == 1 and sleeps == []


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED,
                                  grpc.StatusCode.ABORTED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.NOT_FOUND])
def test_other_codes_are_never_retried(service, client, sleeps, code):
    service.script("GetTemplate", Fail(code, "no"), pb.GetTemplateResponse(template=template()))
    with pytest.raises(errors.InstGenIEError) as caught:
        client.get_template("tpl-1")
    assert caught.value.code == code
    assert len(service.calls("GetTemplate")) == 1 and sleeps == []


def test_create_without_request_id_is_not_retried(service, client, sleeps):
    service.script("CreateTemplate", unavailable(), created())
    with pytest.raises(errors.Unavailable):
        client.create_template(png(), "3", wait=False)
    assert len(service.calls("CreateTemplate")) == 1 and sleeps == []
    assert service.calls("CreateTemplate")[0].request.request_id == ""


def test_create_with_request_id_is_retried_with_it(service, client, sleeps):
    service.script("CreateTemplate", unavailable(), created())
    op = client.create_template(png(), "3", request_id="reg-7", wait=False)
    assert [s.request.request_id for s in service.calls("CreateTemplate")] == ["reg-7", "reg-7"]
    assert isinstance(op, Operation) and op.name == "operations/tpl-1" and not op.done


def test_resource_exhausted_is_retried_only_when_opted_in(address, service, sleeps):
    busy = Fail(grpc.StatusCode.RESOURCE_EXHAUSTED, "cluster full",
                StatusInfo(grpc.StatusCode.RESOURCE_EXHAUSTED, "", retry_after=3.0))
    service.script("Edit", busy)
    with Client(address, API_KEY) as client:
        with pytest.raises(errors.ResourceExhausted) as caught:
            client.edit("tpl-1", MASK, "8")
    assert caught.value.retry_after == 3.0 and sleeps == []
    service.script("Edit", busy, pb.EditResponse(result=edit_result()))
    with Client(address, API_KEY, retry_resource_exhausted=True) as client:
        client.edit("tpl-1", MASK, "8")
    assert len(sleeps) == 1 and 3.0 <= sleeps[0] <= 3.6


def test_delete_not_found_after_an_unavailable_attempt_counts_as_deleted(service, client, sleeps):
    service.script("DeleteTemplate", unavailable(), Fail(grpc.StatusCode.NOT_FOUND, "no template tpl-1"))
    assert client.delete_template("tpl-1") is None
    assert len(service.calls("DeleteTemplate")) == 2


def test_delete_not_found_on_first_attempt_raises(service, client):
    service.script("DeleteTemplate", Fail(grpc.StatusCode.NOT_FOUND, "no template tpl-1"))
    with pytest.raises(errors.NotFound):
        client.delete_template("tpl-1")


def test_delete_of_a_creating_template_is_failed_precondition(service, client):
    service.script("DeleteTemplate", Fail(grpc.StatusCode.FAILED_PRECONDITION, "still creating"))
    with pytest.raises(errors.FailedPrecondition):
        client.delete_template("tpl-1")


def test_unreachable_gateway_is_unavailable_after_retries(sleeps, unused_address):
    with Client(unused_address, max_retries=2) as client:
        with pytest.raises(errors.Unavailable) as caught:
            client.list_models(timeout=10)
    assert caught.value.attempts == 3 and len(sleeps) == 2


@pytest.fixture()
def unused_address():
    import socket
    with socket.socket() as sock:  # a port that was free a moment ago and nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


# -- templates ---------------------------------------------------------------------------------------------------

def test_create_template_waits_with_progress(service, client):
    service.script("CreateTemplate", created())
    service.script("WatchOperation", watched(
        operation(steps_done=0), operation(steps_done=2),
        operation(steps_done=4, done=True, state=pb.TEMPLATE_STATE_READY, response=template())))
    seen: list[Operation] = []
    result = client.create_template(png(), "3", name="shoe", steps=4, seed=11, cache_mode="y", guidance_scale=3.5,
                                    model="digits", progress=seen.append)
    assert isinstance(result, Template)
    assert (result.template_id, result.state, result.cache_mode) == ("tpl-1", TemplateState.READY, CacheMode.KV)
    assert result.create_time.year == 2026 and result.cache_bytes == 123_456
    assert [(op.steps_done, op.done) for op in seen] == [(0, False), (0, False), (2, False), (4, True)]
    request = service.calls("CreateTemplate")[0].request
    assert (request.image, request.prompt, request.name, request.steps, request.seed, request.model) == \
        (png(), "3", "shoe", 4, 11, "digits")
    assert request.cache_mode == pb.CACHE_MODE_Y and request.HasField("guidance_scale")
    assert request.guidance_scale == 3.5
    assert service.calls("WatchOperation")[0].request.name == "operations/tpl-1"


def test_create_template_leaves_guidance_and_cache_mode_to_the_model_by_default(service, client):
    service.script("CreateTemplate", created())
    client.create_template(png(), "3", wait=False)
    request = service.calls("CreateTemplate")[0].request
    assert not request.HasField("guidance_scale") and request.cache_mode == pb.CACHE_MODE_UNSPECIFIED


def test_create_template_raises_the_operations_error(service, client):
    failure = StatusInfo(grpc.StatusCode.INVALID_ARGUMENT, "no model serves 17x17", reason="RESOLUTION",
                         violations=[])
    service.script("CreateTemplate", created())
    service.script("WatchOperation", watched(operation(done=True, state=pb.TEMPLATE_STATE_FAILED, error=failure)))
    with pytest.raises(errors.InvalidArgument, match="no model serves 17x17") as caught:
        client.create_template(png(17, 17), "3")
    assert caught.value.reason == "RESOLUTION"


def test_create_template_falls_back_to_wait_when_the_watch_ends_early(service, client):
    service.script("CreateTemplate", created())
    service.script("WatchOperation", watched(operation(steps_done=1)))  # ends before done: say a gateway restart
    service.script("WaitOperation",
                   pb.WaitOperationResponse(operation=operation(done=True, response=template())))
    assert client.create_template(png(), "3").template_id == "tpl-1"
    assert len(service.calls("WaitOperation")) == 1


def test_create_template_fetches_the_template_when_the_operation_lacks_it(service, client):
    service.script("CreateTemplate", pb.CreateTemplateResponse(operation=operation(done=True)))
    service.script("GetTemplate", pb.GetTemplateResponse(template=template(name="fetched")))
    assert client.create_template(png(), "3").name == "fetched"
    assert service.calls("GetTemplate")[0].request.template_id == "tpl-1"


def test_create_template_deadline_names_the_operation(service, client):
    service.script("CreateTemplate", created())
    service.script("WatchOperation", Fail(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"))
    with pytest.raises(errors.DeadlineExceeded, match="wait_operation\\('operations/tpl-1'\\)"):
        client.create_template(png(), "3")


def test_create_template_refuses_an_unknown_cache_mode(service, client):
    with pytest.raises(ValueError, match="cache_mode"):
        client.create_template(png(), "3", cache_mode="fast")
    assert service.seen == []


def test_watch_operation_resumes_after_unavailable(service, client, sleeps):
    service.script("WatchOperation", Stream([pb.WatchOperationResponse(operation=operation(steps_done=1))],
                                            then=unavailable()),
                   watched(operation(steps_done=3), operation(steps_done=4, done=True)))
    ops = list(client.watch_operation("tpl-1"))
    assert [op.steps_done for op in ops] == [1, 3, 4] and ops[-1].done and len(sleeps) == 1


def test_get_operation_accepts_a_bare_template_id(service, client):
    service.script("GetOperation", pb.GetOperationResponse(operation=operation("tpl-5", steps_done=3)))
    op = client.get_operation("tpl-5")
    assert service.calls("GetOperation")[0].request.name == "operations/tpl-5"
    assert (op.template_id, op.state, op.steps_done, op.error, op.template) == \
        ("tpl-5", TemplateState.CREATING, 3, None, None)


def test_list_and_iterate_templates(service, client):
    service.script("ListTemplates",
                   pb.ListTemplatesResponse(templates=[template("a"), template("b")], next_page_token="p2"),
                   pb.ListTemplatesResponse(templates=[template("c")], next_page_token="p3"),
                   pb.ListTemplatesResponse(templates=[template("d")]),
                   pb.ListTemplatesResponse(templates=[template("x")], next_page_token="more"))
    assert [t.template_id for t in client.iter_templates(page_size=2)] == ["a", "b", "c", "d"]
    assert [(s.request.page_size, s.request.page_token) for s in service.calls("ListTemplates")] == \
        [(2, ""), (2, "p2"), (2, "p3")]
    page = client.list_templates(page_size=1, page_token="tok")
    assert [t.template_id for t in page] == ["x"] and len(page) == 1 and page.next_page_token == "more"


# -- edits -------------------------------------------------------------------------------------------------------

def test_edit_builds_the_request_and_types_the_result(service, client, tmp_path):
    service.script("Edit", pb.EditResponse(result=edit_result("r-9", degraded_reason="cache unreachable")))
    result = client.edit("tpl-1", MASK, "8", seed=0, guidance_scale=2.0, dilate=2, steps=4, request_id="r-9")
    request = service.calls("Edit")[0].request
    assert (request.template_id, request.mask, request.prompt, request.steps, request.dilate) == \
        ("tpl-1", MASK, "8", 4, 2)
    assert request.HasField("seed") and request.seed == 0 and request.guidance_scale == 2.0
    assert isinstance(result, EditResult)
    assert (result.request_id, result.seed, result.mask_ratio, result.worker, result.degraded_reason) == \
        ("r-9", 42, 0.125, "worker-0", "cache unreachable")
    assert "image=" not in repr(result)  # megabytes of PNG stay out of logs
    assert result.pil().getpixel((0, 0)) == (0, 0, 255)
    assert result.save(tmp_path / "out.png").read_bytes() == result.image
    jpeg = result.save(tmp_path / "out.jpg")
    assert Image.open(jpeg).format == "JPEG"


def test_edit_leaves_seed_and_guidance_absent_by_default(service, client):
    service.script("Edit", pb.EditResponse(result=edit_result()))
    client.edit("tpl-1", MASK, "8")
    request = service.calls("Edit")[0].request
    assert not request.HasField("seed") and not request.HasField("guidance_scale")


def test_edit_refuses_an_ambiguous_mask_before_calling(service, client):
    import numpy as np
    with pytest.raises(ValueError, match="0/1 or only 0/255"):
        client.edit("tpl-1", np.array([[0, 7]], np.uint8), "8")
    assert service.seen == []


def test_stream_edit_yields_typed_events_and_ends_after_the_result(service, client):
    events = edit_events("r-1", steps=2)
    extra = pb.StreamEditResponse(request_id="r-1", keepalive=pb.StreamEditResponse.Keepalive())
    service.script("StreamEdit", Stream(events + [extra]))
    got = list(client.stream_edit("tpl-1", MASK, "8", request_id="r-1"))
    assert [type(e) for e in got] == [Accepted, Queued, Keepalive, Started, Progress, Progress, Result]
    assert got[0] == Accepted("r-1", 2.5) and got[1] == Queued("r-1", 1)
    assert got[3] == Started("r-1", "worker-0", 2, "host")
    assert [(e.step, e.total_steps) for e in got[4:6]] == [(1, 2), (2, 2)]
    assert got[-1].result.seed == 42 and got[-1].request_id == "r-1"
    assert service.calls("StreamEdit")[0].request.edit.request_id == "r-1"


def test_stream_edit_reattaches_with_the_same_request_id(service, client, sleeps):
    events = edit_events("r-1", steps=2)
    service.script("StreamEdit", Stream(events[:5], then=unavailable()), Stream(events))
    got = list(client.stream_edit("tpl-1", MASK, "8"))
    ids = {s.request.edit.request_id for s in service.calls("StreamEdit")}
    assert len(service.calls("StreamEdit")) == 2 and len(ids) == 1 and len(sleeps) == 1
    assert isinstance(got[-1], Result) and len(got) == 5 + len(events)  # the server replays from the start


def test_stream_edit_failure_is_typed_after_the_events_so_far(service, client, sleeps):
    events = edit_events("r-1")
    service.script("StreamEdit", Stream(events[:2], then=Fail(grpc.StatusCode.CANCELLED, "edit cancelled")))
    got = []
    with pytest.raises(errors.Cancelled, match="edit cancelled"):
        for event in client.stream_edit("tpl-1", MASK, "8"):
            got.append(event)
    assert [type(e) for e in got] == [Accepted, Queued] and sleeps == []


def test_stream_edit_invalid_argument_carries_violations(service, client):
    service.script("StreamEdit", invalid_argument("mask", "the mask is empty"))
    with pytest.raises(errors.InvalidArgument) as caught:
        list(client.stream_edit("tpl-1", MASK, "8"))
    assert caught.value.violations[0].field == "mask"


def test_stream_edit_without_a_result_is_an_error(service, client):
    service.script("StreamEdit", Stream(edit_events("r-1")[:3]))
    with pytest.raises(errors.Unknown, match="without a result"):
        list(client.stream_edit("tpl-1", MASK, "8"))


def test_leaving_a_stream_edit_early_cancels_the_call(service, client):
    release = threading.Event()
    service.script("StreamEdit", Stream(edit_events("r-1")[:2], hold=release))
    events = client.stream_edit("tpl-1", MASK, "8")
    assert isinstance(next(events), Accepted)
    events.close()
    try:
        assert service.cancelled["StreamEdit"].wait(timeout=10), "the server never saw the cancellation"
    finally:
        release.set()


def test_cancel_edit_outcomes(service, client):
    service.script("CancelEdit", pb.CancelEditResponse(outcome=pb.CANCEL_OUTCOME_CANCELLED),
                   pb.CancelEditResponse(outcome=pb.CANCEL_OUTCOME_ALREADY_FINISHED))
    assert client.cancel_edit("r-1") == "cancelled" == CancelOutcome.CANCELLED
    assert client.cancel_edit("r-1") == "already_finished"
    assert [s.request.request_id for s in service.calls("CancelEdit")] == ["r-1", "r-1"]


def test_list_models(service, client):
    service.script("ListModels", pb.ListModelsResponse(models=[pb.Model(
        name="digits", width=16, height=16, default_steps=4, max_steps=50, guidance="none", workers=2)]))
    (model,) = client.list_models()
    assert (model.name, model.width, model.default_steps, model.max_steps, model.guidance, model.workers) == \
        ("digits", 16, 4, 50, "none", 2)
