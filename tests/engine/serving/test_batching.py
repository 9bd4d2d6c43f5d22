"""Continuous batching is exact: a request's result does not depend on who shares its steps."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from instgenie.engine.request import EditRequest
from instgenie.engine.serving.loop import EngineLoop, RequestAborted
from instgenie.engine.serving.scheduler import Status
from instgenie.engine.template_cache import step_shard
from tests.engine.helpers import masks_for, random_image


def _setup(editor, mode, steps=4):
    res = editor.model.info.resolution
    t1 = editor.register_template(random_image(res, 1), "first", mode=mode, steps=steps, seed=1)
    t2 = editor.register_template(random_image(res, 2), "second", mode=mode, steps=steps, seed=2)
    masks = masks_for(res)
    requests = [
        EditRequest(t1.template_id, masks["unaligned"], "a boat", seed=3),
        EditRequest(t2.template_id, masks["disc"], "a tree", seed=4),
        EditRequest(t1.template_id, masks["scattered"], "a cat", seed=5),
    ]
    return requests


def _alone(editor, request):
    state = editor.start(EditRequest(request.template_id, request.mask, request.prompt, seed=request.seed))
    while not state.done:
        editor.step([state])
    return state.latents


@pytest.mark.parametrize("mode", ["kv", "y"])
def test_result_is_the_same_alone_or_joining_a_busy_batch_at_any_step(tiny_editor, mode):
    requests = _setup(tiny_editor, mode)
    joiner, others = requests[0], requests[1:]
    expected = _alone(tiny_editor, joiner)
    for join_at in range(4):
        busy = [tiny_editor.start(r) for r in others]
        for _ in range(join_at):
            tiny_editor.step(busy)
        state = tiny_editor.start(joiner)
        running = busy + [state]
        while running:
            tiny_editor.step(running)  # mixed timesteps and mask sizes in one packed step
            running = [s for s in running if not s.done]
        err = (state.latents - expected).abs().max().item()
        assert err < 1e-5, f"joined at step {join_at}: differs from running alone by {err}"
        for s, r in zip(busy, others):
            assert (s.latents - _alone(tiny_editor, r)).abs().max().item() < 1e-5


def test_engine_loop_results_match_running_alone(tiny_editor):
    requests = _setup(tiny_editor, "kv")
    expected = {r.request_id: _alone(tiny_editor, r) for r in requests}
    loop = EngineLoop(tiny_editor, max_batch_size=4)
    try:
        handles = [loop.submit(r) for r in requests]
        for h in handles:
            result = h.result(timeout=60)
            assert (result.latents - expected[h.request_id]).abs().max().item() < 1e-5
            assert h.timing.queue_seconds is not None and h.timing.latency_seconds > 0
        assert loop.stats.steps >= 4
        assert max(loop.scheduler.stats.batch_sizes) > 1  # requests really shared steps
    finally:
        loop.stop()


def _long_template(editor, steps=40):
    res = editor.model.info.resolution
    return editor.register_template(random_image(res, 9), "long", steps=steps, seed=9), masks_for(res)["disc"]


def test_cancel_frees_the_slot_and_neighbours_finish(tiny_editor):
    tpl, mask = _long_template(tiny_editor)
    loop = EngineLoop(tiny_editor, max_batch_size=2)
    try:
        victim = loop.submit(EditRequest(tpl.template_id, mask, "x", seed=1))
        neighbour = loop.submit(EditRequest(tpl.template_id, mask, "y", seed=2))
        waiting = loop.submit(EditRequest(tpl.template_id, mask, "z", seed=3))  # needs the freed slot
        while True:  # wait until the victim has made progress
            ev = victim.events.get(timeout=30)
            if ev.status == Status.RUNNING and ev.steps_done >= 2:
                break
        assert victim.cancel()
        with pytest.raises(RequestAborted) as err:
            victim.result(timeout=30)
        assert err.value.status == Status.CANCELLED and err.value.grpc_code == "CANCELLED"
        assert neighbour.result(timeout=60).steps == 40
        assert waiting.result(timeout=60).steps == 40
    finally:
        loop.stop()


def test_deadline_expires_between_steps(tiny_editor):
    tpl, mask = _long_template(tiny_editor)
    # A clock that ticks once per reading: the scheduler reads it a few times per step, so a deadline of 30
    # ticks passes after a few of the 40 steps however fast this machine runs them (a wall-clock deadline raced).
    ticks = itertools.count()
    loop = EngineLoop(tiny_editor, max_batch_size=2, clock=lambda: float(next(ticks)))
    try:
        late = loop.submit(EditRequest(tpl.template_id, mask, "x", deadline=30.0))
        ok = loop.submit(EditRequest(tpl.template_id, mask, "y"))
        with pytest.raises(RequestAborted) as err:
            late.result(timeout=30)
        assert err.value.status == Status.EXPIRED and err.value.grpc_code == "DEADLINE_EXCEEDED"
        steps_done = [ev.steps_done for ev in list(late.events.queue)
                      if ev is not None and ev.status == Status.RUNNING]
        assert steps_done and 0 < max(steps_done) < 40, "expired between steps, not before or after the run"
        assert ok.result(timeout=60).steps == 40
    finally:
        loop.stop()


def test_a_failing_request_does_not_harm_its_batch_neighbours(tiny_editor, tmp_path):
    requests = _setup(tiny_editor, "kv")
    good = requests[1]
    expected = _alone(tiny_editor, good)
    # A third template whose step-2 shard is corrupt on disk: its edit fails at step 2, mid-batch.
    res = tiny_editor.model.info.resolution
    bad_tpl = tiny_editor.register_template(random_image(res, 7), "bad", steps=4, seed=7)
    path = tmp_path / "store" / "templates" / bad_tpl.template_id / step_shard(2)
    data = bytearray(path.read_bytes()); data[-3] ^= 0xFF; path.write_bytes(bytes(data))
    loop = EngineLoop(tiny_editor, max_batch_size=4)
    try:
        strict = loop.submit(EditRequest(bad_tpl.template_id, masks_for(res)["disc"], "x", fallback_to_full=False))
        degraded = loop.submit(EditRequest(bad_tpl.template_id, masks_for(res)["disc"], "x"))
        ok = loop.submit(good)
        with pytest.raises(RequestAborted, match="corrupt"):
            strict.result(timeout=60)
        # by default the request survives: from the corrupt step on it computes every token
        assert "corrupt" in degraded.result(timeout=60).degraded
        result = ok.result(timeout=60)
        assert result.degraded is None
        assert (result.latents - expected).abs().max().item() < 1e-5
    finally:
        loop.stop()


def test_a_request_that_breaks_the_shared_forward_is_isolated(tiny_editor):
    requests = _setup(tiny_editor, "kv")
    expected = _alone(tiny_editor, requests[1])
    loop = EngineLoop(tiny_editor, max_batch_size=4)
    original_start = tiny_editor.start

    def start(request):
        state = original_start(request)
        if request.prompt == "poison":  # its cache has the wrong shape: the packed transformer call raises
            good = state.cache
            state.cache = lambda step: {k: v[..., :1] for k, v in good(step).items()}
        return state

    tiny_editor.start = start
    try:
        poison = loop.submit(EditRequest(requests[0].template_id, requests[0].mask, "poison"))
        ok = loop.submit(requests[1])
        with pytest.raises(RequestAborted):
            poison.result(timeout=60)
        assert (ok.result(timeout=60).latents - expected).abs().max().item() < 1e-5
    finally:
        tiny_editor.start = original_start
        loop.stop()


def test_bad_input_fails_only_its_own_request(tiny_editor):
    requests = _setup(tiny_editor, "kv")
    loop = EngineLoop(tiny_editor)
    try:
        bad = loop.submit(EditRequest(requests[0].template_id, np.zeros((3, 3)), "x"))
        ok = loop.submit(requests[1])
        with pytest.raises(Exception, match="template's size"):
            bad.result(timeout=30)
        assert ok.result(timeout=60) is not None
    finally:
        loop.stop()
