"""The public API end to end over real servers on loopback: register -> edit -> stream -> cancel -> delete,
tenants, idempotency, and the mesh's edit equal to the same edit in one process."""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import torch

from instgenie.gateway.v1 import edit_service_pb2 as pb
from instgenie.scheduler.v1 import scheduler_service_pb2 as spb
from instgenie.scheduler.v1 import scheduler_service_pb2_grpc as spb_grpc

from .mesh_helpers import auth, channel, create_template, decode, digit, half_mask, png, stub


@pytest.fixture(scope="module")
def gw(mesh):
    with channel(mesh) as ch:
        yield stub(ch)


@pytest.fixture(scope="module")
def template(gw):
    return create_template(gw, "alpha", digit(3), prompt="3", seed=0)


@pytest.fixture(scope="module")
def slow_template(gw):
    """200 steps: an edit of it runs long enough to be cancelled or interrupted mid-way."""
    return create_template(gw, "alpha", digit(5), prompt="5", steps=200, seed=1)


def scheduler_status(mesh):
    with grpc.insecure_channel(mesh.scheduler.address) as ch:
        return spb_grpc.SchedulerServiceStub(ch).GetClusterStatus(spb.GetClusterStatusRequest(), timeout=5)


def test_template_lifecycle_and_listing(gw, template):
    t = gw.GetTemplate(pb.GetTemplateRequest(template_id=template), metadata=auth(), timeout=10).template
    assert t.state == pb.TEMPLATE_STATE_READY and (t.width, t.height) == (16, 16) and t.steps == 20
    assert t.cache_bytes > 0 and t.model == "digits-16px" and t.operation == f"operations/{template}"
    op = gw.GetOperation(pb.GetOperationRequest(name=t.operation), metadata=auth(), timeout=10).operation
    done = pb.Template()
    assert op.done and op.response.Unpack(done) and done.template_id == template
    listed = gw.ListTemplates(pb.ListTemplatesRequest(page_size=1000), metadata=auth(), timeout=10).templates
    assert template in [x.template_id for x in listed]


def test_watch_operation_streams_progress_to_done(gw):
    op = gw.CreateTemplate(pb.CreateTemplateRequest(image=png(digit(7)), prompt="7"), metadata=auth(),
                           timeout=10).operation
    states = []
    for msg in gw.WatchOperation(pb.WatchOperationRequest(name=op.name), metadata=auth(), timeout=120):
        meta = pb.CreateTemplateMetadata()
        msg.operation.metadata.Unpack(meta)
        states.append((meta.state, meta.steps_done, msg.operation.done))
    assert states[-1] == (pb.TEMPLATE_STATE_READY, 20, True)
    assert all(not done for _, _, done in states[:-1])
    steps = [s for _, s, _ in states]
    assert steps == sorted(steps)


def test_mesh_edit_equals_the_same_edit_in_one_process(gw, template, tmp_path):
    """Same model, template image, prompt, seeds and mask: the pixels through three services are the engine's."""
    from instgenie.engine.editor import Editor
    from instgenie.engine.models.loader import preset_model
    from instgenie.engine.template_cache import DirectoryBlobStore, TemplateStore

    mask = half_mask("right")
    result = gw.Edit(pb.EditRequest(template_id=template, mask=png(mask), prompt="8", seed=11), metadata=auth(),
                     timeout=60).result
    assert result.mime_type == "image/png" and result.seed == 11 and result.steps == 20
    assert 0 < result.mask_ratio < 1 and result.worker and not result.degraded_reason
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers run with one thread: same reduction order, same bits
    try:
        editor = Editor(preset_model("digits"), TemplateStore(DirectoryBlobStore(tmp_path / "store")))
        tpl = editor.register_template(digit(3), "3", seed=0, mode="kv")
        local = editor.edit(tpl.template_id, mask, "8", seed=11)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(decode(result.image), np.asarray(local.image))
    # Outside the mask the template's pixels come back untouched.
    np.testing.assert_array_equal(decode(result.image)[:, :8], digit(3)[:, :8])


def test_stream_edit_event_sequence(gw, template):
    events = list(gw.StreamEdit(pb.StreamEditRequest(edit=pb.EditRequest(
        template_id=template, mask=png(half_mask("left")), prompt="1", seed=3, request_id="stream-seq-1")),
        metadata=auth(), timeout=60))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "accepted" and kinds[-1] == "result"
    assert "started" in kinds and all(e.request_id == "stream-seq-1" for e in events)
    steps = [e.progress.step for e in events if e.WhichOneof("event") == "progress"]
    assert steps == list(range(1, 21))
    assert kinds.index("started") < kinds.index("progress")
    started = next(e.started for e in events if e.WhichOneof("event") == "started")
    assert started.worker and started.batch_size >= 1 and started.cache_tier in ("host", "store")


def test_stream_edit_sends_keepalives_while_waiting(gw, slow_template):
    """The fixture's gateway sends a keepalive after 0.3 s without an event; a 200-step edit has such gaps
    only while queued, so keep both workers busy and watch a queued edit."""
    streams = [gw.StreamEdit(pb.StreamEditRequest(edit=pb.EditRequest(
        template_id=slow_template, mask=png(half_mask()), prompt="2", seed=i)), metadata=auth(), timeout=120)
        for i in range(12)]
    kinds = set()
    for s in streams:
        for e in s:
            kinds.add(e.WhichOneof("event"))
    assert {"accepted", "queued", "started", "progress", "result"} <= kinds
    assert "keepalive" in kinds


def test_cancel_stops_one_edit_and_leaves_its_batch_running(gw, slow_template, mesh):
    def stream(seed, rid):
        return gw.StreamEdit(pb.StreamEditRequest(edit=pb.EditRequest(
            template_id=slow_template, mask=png(half_mask()), prompt="6", seed=seed, request_id=rid)),
            metadata=auth(), timeout=120)

    # Four edits over two workers: one worker holds at least two of them, whatever the placement policy
    # decides. The victim is one of those, so its batch has a neighbour that must run on to its result.
    streams = {f"batch-{i}": iter(stream(i, f"batch-{i}")) for i in range(4)}
    seen: dict[str, list] = {rid: [] for rid in streams}
    worker_of = {}
    for rid, it in streams.items():
        for e in it:
            seen[rid].append(e)
            if e.WhichOneof("event") == "started":
                worker_of[rid] = e.started.worker
                break
    victim = next(rid for rid in streams if list(worker_of.values()).count(worker_of[rid]) >= 2)
    mates = [rid for rid in streams if rid != victim and worker_of[rid] == worker_of[victim]]
    it = streams[victim]
    for e in it:
        if e.WhichOneof("event") == "progress":
            break
    resp = gw.CancelEdit(pb.CancelEditRequest(request_id=victim), metadata=auth(), timeout=10)
    assert resp.outcome == pb.CANCEL_OUTCOME_CANCELLED
    with pytest.raises(grpc.RpcError) as err:
        for _ in it:
            pass
    assert err.value.code() == grpc.StatusCode.CANCELLED
    for rid, it in streams.items():
        if rid == victim:
            continue
        events = seen[rid] + list(it)
        assert events[-1].WhichOneof("event") == "result", rid
        if rid in mates:  # it shared the victim's batch and ran on without it
            assert max(e.progress.batch_size for e in events if e.WhichOneof("event") == "progress") >= 2
    # A cancel after the edit left the loop changes nothing and says so.
    late = gw.CancelEdit(pb.CancelEditRequest(request_id=mates[0]), metadata=auth(), timeout=10)
    assert late.outcome == pb.CANCEL_OUTCOME_ALREADY_FINISHED


def test_client_disconnect_frees_the_slot(gw, slow_template, mesh):
    call = gw.StreamEdit(pb.StreamEditRequest(edit=pb.EditRequest(
        template_id=slow_template, mask=png(half_mask()), prompt="4", seed=99, request_id="walk-away")),
        metadata=auth(), timeout=120)
    for e in call:
        if e.WhichOneof("event") == "progress":
            break
    call.cancel()

    def idle():
        status = scheduler_status(mesh)
        return status.in_flight == 0 and all(not w.load.running and not w.load.waiting for w in status.workers)

    from .mesh_helpers import wait_for
    assert wait_for(idle, timeout=15), scheduler_status(mesh)


def test_request_id_makes_edit_idempotent(gw, template, mesh):
    req = pb.EditRequest(template_id=template, mask=png(half_mask()), prompt="9", seed=5, request_id="idem-1")
    placed = scheduler_status(mesh).edits_placed
    first = gw.Edit(req, metadata=auth(), timeout=60).result
    second = gw.Edit(req, metadata=auth(), timeout=60).result
    assert first.image == second.image and first.request_id == second.request_id == "idem-1"
    assert scheduler_status(mesh).edits_placed == placed + 1  # the retry ran nothing
    # A retry as a stream asking for previews is still the same edit: it gets the same result.
    replay = list(gw.StreamEdit(pb.StreamEditRequest(edit=pb.EditRequest(
        template_id=template, mask=png(half_mask()), prompt="9", seed=5, request_id="idem-1",
        preview_every_steps=5)), metadata=auth(), timeout=60))
    assert replay[-1].result.image == first.image
    assert scheduler_status(mesh).edits_placed == placed + 1
    # Concurrent duplicates follow one run.
    req.request_id = "idem-2"
    results = [None] * 4

    def go(i):
        results[i] = gw.Edit(req, metadata=auth(), timeout=60).result.image

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(set(results)) == 1 and scheduler_status(mesh).edits_placed == placed + 2
    # Another tenant may use the same request id for its own edit.
    other = create_template(gw, "beta", digit(2), prompt="2")
    beta = gw.Edit(pb.EditRequest(template_id=other, mask=png(half_mask()), prompt="9", seed=5,
                                  request_id="idem-1"), metadata=auth("beta"), timeout=60).result
    assert beta.template_id == other
    # The same id with different inputs is refused.
    req.request_id, req.seed = "idem-1", 6
    with pytest.raises(grpc.RpcError) as err:
        gw.Edit(req, metadata=auth(), timeout=60)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_tenants_cannot_see_each_other(gw, template):
    with pytest.raises(grpc.RpcError) as err:
        gw.GetTemplate(pb.GetTemplateRequest(template_id=template), metadata=auth("beta"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        gw.Edit(pb.EditRequest(template_id=template, mask=png(half_mask()), prompt="1"), metadata=auth("beta"),
                timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        gw.DeleteTemplate(pb.DeleteTemplateRequest(template_id=template), metadata=auth("beta"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    beta_ids = [t.template_id for t in gw.ListTemplates(pb.ListTemplatesRequest(), metadata=auth("beta"),
                                                        timeout=10).templates]
    assert template not in beta_ids
    with pytest.raises(grpc.RpcError) as err:
        gw.ListTemplates(pb.ListTemplatesRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_delete_then_template_is_gone(gw):
    tid = create_template(gw, "alpha", digit(1), prompt="1")
    gw.DeleteTemplate(pb.DeleteTemplateRequest(template_id=tid), metadata=auth(), timeout=10)
    for call in (lambda: gw.GetTemplate(pb.GetTemplateRequest(template_id=tid), metadata=auth(), timeout=10),
                 lambda: gw.Edit(pb.EditRequest(template_id=tid, mask=png(half_mask()), prompt="2"),
                                 metadata=auth(), timeout=30),
                 lambda: gw.DeleteTemplate(pb.DeleteTemplateRequest(template_id=tid), metadata=auth(), timeout=10)):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_list_models(gw):
    models = gw.ListModels(pb.ListModelsRequest(), metadata=auth(), timeout=10).models
    assert [(m.name, m.width, m.height, m.workers, m.guidance) for m in models] == [("digits-16px", 16, 16, 2, "cfg")]


def test_deadline_propagates_and_the_worker_drops_the_edit(gw, slow_template, mesh):
    """A 0.3 s deadline on a 200-step edit (about a second of steps alone on this model): the client gets
    DEADLINE_EXCEEDED and the worker stops stepping it (its step counter stays below 200 more steps), i.e. the
    deadline reached the step loop."""
    from .mesh_helpers import wait_for

    def steps_run():
        return sum(w.load.steps_run for w in scheduler_status(mesh).workers)

    def idle():
        status = scheduler_status(mesh)
        return status.in_flight == 0 and all(not w.load.running and not w.load.waiting for w in status.workers)

    assert wait_for(idle, timeout=30)
    before = steps_run()
    with pytest.raises(grpc.RpcError) as err:
        gw.Edit(pb.EditRequest(template_id=slow_template, mask=png(half_mask()), prompt="3", seed=8),
                metadata=auth(), timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(idle, timeout=10)
    time.sleep(1.0)  # what a worker that ignored the deadline would have stepped on in the meantime
    assert steps_run() - before < 200
