"""The engine loop's client contract: cancellation outcomes and bookkeeping, snapshots, typed submit errors.

Phases are pinned with gates (threading.Event) around the editor's own methods, never with sleeps, so each
test reaches the exact moment it is about (pre-processing, stepping, decoding) on any machine.
"""
from __future__ import annotations

import queue
import threading
import time

import pytest

from instgenie.engine.errors import EngineStoppedError, RequestInFlightError
from instgenie.engine.request import EditRequest
from instgenie.engine.serving.loop import CancelOutcome, EngineLoop, RequestAborted
from instgenie.engine.serving.scheduler import Status
from tests.engine.helpers import masks_for, random_image

WAIT = 60  # generous ceilings for blocking waits; no assertion depends on them


@pytest.fixture()
def template(tiny_editor):
    res = tiny_editor.model.info.resolution
    return tiny_editor.register_template(random_image(res, 1), "t", steps=4, seed=1).template_id


def _request(editor, template_id, rid, seed=1):
    return EditRequest(template_id, masks_for(editor.model.info.resolution)["disc"], "x", seed=seed, request_id=rid)


def _gate(editor, name):
    """Make editor.<name> wait until the returned event is set; `entered` is set when a call is waiting."""
    original = getattr(editor, name)
    release, entered = threading.Event(), threading.Event()

    def gated(*args, **kwargs):
        entered.set()
        assert release.wait(WAIT), f"{name} gate never opened"
        return original(*args, **kwargs)

    setattr(editor, name, gated)
    return release, entered


def _assert_nothing_remembered(loop):
    assert loop.in_flight() == 0 and loop._handles == {} and loop._scheduled == {}
    s = loop.scheduler
    assert not s.entries and not s.running and not s.waiting and not s._cancelled


def _wait_until(condition, what: str) -> None:
    """Poll a condition the loop will reach; the ceiling only turns a hang into a failure."""
    end = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < end, f"never reached: {what}"
        time.sleep(0.002)


def _events_until(handle, predicate):
    while True:
        ev = handle.events.get(timeout=WAIT)
        if ev is None or predicate(ev):
            return ev


def test_cancel_after_the_step_loop_is_a_no_op_and_the_id_is_free_for_reuse(tiny_editor, template):
    alone = tiny_editor.edit(template, masks_for(tiny_editor.model.info.resolution)["disc"], "x", seed=1)
    release, entered = _gate(tiny_editor, "finish")
    loop = EngineLoop(tiny_editor)
    try:
        first = loop.submit(_request(tiny_editor, template, "same-id"))
        assert entered.wait(WAIT)  # every step done, decoding
        outcome = loop.cancel("same-id")
        assert outcome is CancelOutcome.ALREADY_FINISHED and not outcome
        release.set()
        assert (first.result(WAIT).latents - alone.latents).abs().max().item() == 0
        assert loop.cancel("same-id") is CancelOutcome.NOT_FOUND
        _assert_nothing_remembered(loop)
        again = loop.submit(_request(tiny_editor, template, "same-id"))  # reused id runs normally
        assert (again.result(WAIT).latents - alone.latents).abs().max().item() == 0
        assert again.result().steps == 4
        _assert_nothing_remembered(loop)
    finally:
        release.set()
        loop.stop()


def test_cancel_during_preprocessing_resolves_at_once_and_drops_the_late_state(tiny_editor, template):
    release, entered = _gate(tiny_editor, "start")
    loop = EngineLoop(tiny_editor)
    try:
        handle = loop.submit(_request(tiny_editor, template, "pre"))
        assert entered.wait(WAIT)
        assert loop.cancel("pre") is CancelOutcome.CANCELLED
        assert loop.cancel("pre") is CancelOutcome.NOT_FOUND  # resolved: nothing left of it
        with pytest.raises(RequestAborted) as err:
            handle.result(0)  # already resolved, before its pre-processing even ended
        assert err.value.status == Status.CANCELLED and err.value.code == "CANCELLED"
        reuse = loop.submit(_request(tiny_editor, template, "pre"))
        release.set()
        assert reuse.result(WAIT).steps == 4  # the cancelled request's state never reached the scheduler
        _assert_nothing_remembered(loop)
    finally:
        release.set()
        loop.stop()


def test_cancel_outcome_is_truthful_at_every_step_including_the_last(tiny_editor, template):
    """CANCELLED always means no result; ALREADY_FINISHED always means the result comes."""
    loop = EngineLoop(tiny_editor, max_batch_size=2)
    outcomes = []
    try:
        for k in range(12):
            at_step = k % 5  # 0..3: while running (3 = the last step may complete first); 4: while decoding
            handle = loop.submit(_request(tiny_editor, template, f"c{k}", seed=k))
            if at_step < 4:
                _events_until(handle, lambda ev: ev.status == Status.RUNNING and ev.steps_done >= at_step)
            else:
                _events_until(handle, lambda ev: ev.status == Status.FINISHED)
            outcome = handle.cancel()
            try:
                handle.result(WAIT)
                delivered = True
            except RequestAborted as exc:
                assert exc.status == Status.CANCELLED
                delivered = False
            assert delivered == (outcome is not CancelOutcome.CANCELLED), (k, outcome)
            assert outcome is not CancelOutcome.NOT_FOUND or delivered
            outcomes.append(outcome)
        assert CancelOutcome.CANCELLED in outcomes and CancelOutcome.ALREADY_FINISHED in outcomes
        _assert_nothing_remembered(loop)
    finally:
        loop.stop()


def test_cancel_that_races_the_last_step_still_delivers_no_result(tiny_editor, template):
    permits, calls = threading.Semaphore(0), []
    step = tiny_editor.step

    def gated_step(states, use_cache=None):
        calls.append(states[0].step_index)
        assert permits.acquire(timeout=WAIT), "step gate never opened"
        return step(states, use_cache)

    tiny_editor.step = gated_step
    loop = EngineLoop(tiny_editor)
    try:
        handle = loop.submit(_request(tiny_editor, template, "last"))
        permits.release(3)
        _wait_until(lambda: calls == [0, 1, 2, 3], "the last step under way")
        assert loop.cancel("last") is CancelOutcome.CANCELLED  # the step completes before the loop reads it
        permits.release()
        with pytest.raises(RequestAborted) as err:
            handle.result(WAIT)
        assert err.value.status == Status.CANCELLED
        _assert_nothing_remembered(loop)
    finally:
        permits.release(100)
        loop.stop()


def test_a_cancelled_running_request_ends_its_stream_with_a_cancelled_event(tiny_editor, template):
    loop = EngineLoop(tiny_editor)
    try:
        handle = loop.submit(_request(tiny_editor, template, "run"))
        _events_until(handle, lambda ev: ev.status == Status.RUNNING)
        assert loop.cancel("run") is CancelOutcome.CANCELLED
        assert loop.cancel("run") in (CancelOutcome.CANCELLED, CancelOutcome.NOT_FOUND)  # idempotent, never a lie
        last = _events_until(handle, lambda ev: ev.status.terminal)
        assert last.status == Status.CANCELLED and handle.events.get(timeout=WAIT) is None
        with pytest.raises(RequestAborted):
            handle.result(WAIT)
        _assert_nothing_remembered(loop)
    finally:
        loop.stop()


def test_unknown_id_is_not_found(tiny_editor):
    loop = EngineLoop(tiny_editor)
    try:
        outcome = loop.cancel("never-submitted")
        assert outcome is CancelOutcome.NOT_FOUND and not outcome
    finally:
        loop.stop()


def test_snapshot_shows_the_running_batch_the_queue_in_order_and_preprocessing(tiny_editor, template):
    permits, calls = threading.Semaphore(0), []
    step = tiny_editor.step

    def gated_step(states, use_cache=None):  # one step per permit
        calls.append([s.request.request_id for s in states])
        assert permits.acquire(timeout=WAIT), "step gate never opened"
        return step(states, use_cache)

    tiny_editor.step = gated_step
    loop = EngineLoop(tiny_editor, max_batch_size=1)
    release_start = threading.Event()
    try:
        handles = [loop.submit(_request(tiny_editor, template, rid)) for rid in ("a", "b", "c")]
        _wait_until(lambda: len(calls) == 1 and loop._ready.qsize() == 2, "a stepping, b and c pre-processed")
        permits.release()  # a's first step; the next iteration takes b and c in before stepping again
        _wait_until(lambda: len(calls) == 2, "a's second step")
        snap = loop.snapshot()
        assert [r.request_id for r in snap.running] == ["a"]
        assert [r.request_id for r in snap.waiting] == ["b", "c"]
        a = snap.running[0]
        assert (a.template_id, a.steps_done, a.total_steps) == (template, 1, 4) and a.tokens > 0
        assert snap.waiting[0].steps_done == 0 and snap.waiting[0].tokens == a.tokens
        assert snap.preparing == 0 and snap.finishing == 0 and snap.in_flight == 3 and snap.steps == 1
        release_start, entered = _gate(tiny_editor, "start")
        loop.submit(_request(tiny_editor, template, "d"))
        assert entered.wait(WAIT)
        assert loop.snapshot().preparing == 1
        seen = [loop.snapshot().steps]
        permits.release(100)
        for h in handles:
            h.result(WAIT)
            seen.append(loop.snapshot().steps)
        assert seen == sorted(seen) and seen[-1] >= 12
    finally:
        permits.release(100)
        release_start.set()
        loop.stop(drain=False)


def test_running_events_carry_their_batch_size(tiny_editor, template):
    loop = EngineLoop(tiny_editor, max_batch_size=2)
    sink = queue.Queue()
    try:
        handles = [loop.submit(_request(tiny_editor, template, f"b{i}", seed=i), events=sink if i == 0 else None)
                   for i in range(2)]
        for h in handles:
            h.result(WAIT)
        events = []
        while (ev := sink.get(timeout=WAIT)) is not None:
            events.append(ev)
        assert all(ev.batch_size in (1, 2) for ev in events)
        stepped = [ev for ev in events if ev.steps_done > 0]
        assert events[0].steps_done == 0 and stepped
        assert stepped[-1].status == Status.FINISHED
    finally:
        loop.stop()


def test_duplicate_in_flight_id_and_stopped_loop_are_typed(tiny_editor, template):
    release, entered = _gate(tiny_editor, "start")
    loop = EngineLoop(tiny_editor)
    try:
        loop.submit(_request(tiny_editor, template, "dup"))
        with pytest.raises(RequestInFlightError) as err:
            loop.submit(_request(tiny_editor, template, "dup"))
        assert (err.value.code, err.value.grpc_code, err.value.field) == ("REQUEST_IN_FLIGHT", "ALREADY_EXISTS",
                                                                          "request_id")
        assert isinstance(err.value, ValueError)  # callers that caught ValueError keep working
    finally:
        release.set()
        loop.stop()
    with pytest.raises(EngineStoppedError) as err:
        loop.submit(_request(tiny_editor, template, "late"))
    assert err.value.grpc_code == "UNAVAILABLE" and isinstance(err.value, RuntimeError)
