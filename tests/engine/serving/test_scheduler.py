"""The step scheduler alone, on fake step outcomes and a fake clock."""
from __future__ import annotations

import pytest

from instgenie.engine.serving.scheduler import Entry, Status, StepScheduler


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def entry(rid, steps=3, tokens=10, key="k", deadline=None):
    return Entry(request_id=rid, key=key, tokens=tokens, total_steps=steps, deadline=deadline)


def run_step(s: StepScheduler, failed=None):
    plan = s.schedule()
    events = s.update(plan, failed) if plan else []
    return plan, events


def test_new_requests_join_at_the_next_step_and_leave_when_done():
    s = StepScheduler(max_batch_size=4, clock=Clock())
    s.add(entry("a", steps=3))
    plan, _ = run_step(s)
    assert plan.request_ids == ["a"]
    s.add(entry("b", steps=2))
    plan, _ = run_step(s)
    assert plan.request_ids == ["a", "b"]
    plan, events = run_step(s)
    assert plan.request_ids == ["a", "b"]
    assert {e.request_id for e in events if e.status == Status.FINISHED} == {"a", "b"}
    assert s.schedule() is None and not s.has_work()


def test_batch_size_and_token_limits_hold_fcfs():
    s = StepScheduler(max_batch_size=2, max_tokens_per_step=25, clock=Clock())
    for rid, tok in [("a", 10), ("b", 10), ("c", 10)]:
        s.add(entry(rid, tokens=tok))
    assert s.schedule().request_ids == ["a", "b"]
    s2 = StepScheduler(max_batch_size=8, max_tokens_per_step=25, clock=Clock())
    for rid, tok in [("a", 20), ("b", 10), ("c", 5)]:
        s2.add(entry(rid, tokens=tok))
    assert s2.schedule().request_ids == ["a", "c"]  # b does not fit the token budget; c does
    with pytest.raises(ValueError, match="step limit"):
        s2.add(entry("huge", tokens=26))


def test_cancel_and_deadline_free_the_slot_at_the_next_step():
    clock = Clock()
    s = StepScheduler(max_batch_size=2, clock=clock)
    s.add(entry("a", steps=5))
    s.add(entry("b", steps=5, deadline=clock.now + 1))
    s.add(entry("c", steps=5))
    assert run_step(s)[0].request_ids == ["a", "b"]
    assert s.cancel("a")
    clock.now += 2  # b's deadline passes
    plan, _ = run_step(s)
    assert plan.request_ids == ["c"]
    statuses = {rid: s.entries[rid].status for rid in "abc"}
    assert statuses == {"a": Status.CANCELLED, "b": Status.EXPIRED, "c": Status.RUNNING}
    assert not s.cancel("a")  # already over
    assert s.stats.cancelled == 1 and s.stats.expired == 1


def test_cancel_while_waiting():
    s = StepScheduler(max_batch_size=1, clock=Clock())
    s.add(entry("a"))
    s.add(entry("b"))
    run_step(s)
    s.cancel("b")
    plan, _ = run_step(s)
    assert plan.request_ids == ["a"] and s.entries["b"].status == Status.CANCELLED
    assert list(s.waiting) == []


def test_a_failed_request_leaves_alone():
    s = StepScheduler(max_batch_size=4, clock=Clock())
    s.add(entry("a", steps=2))
    s.add(entry("b", steps=2))
    plan, events = run_step(s, failed={"a": "boom"})
    assert s.entries["a"].status == Status.FAILED and s.entries["a"].error == "boom"
    plan, events = run_step(s)
    assert plan.request_ids == ["b"]
    assert [e.status for e in events] == [Status.FINISHED]


def test_static_batching_admits_only_when_idle():
    s = StepScheduler(max_batch_size=4, continuous=False, clock=Clock())
    s.add(entry("a", steps=2))
    run_step(s)
    s.add(entry("b", steps=2))
    assert run_step(s)[0].request_ids == ["a"]  # b waits for the batch to finish
    assert run_step(s)[0].request_ids == ["b"]


def test_key_groups_alternate():
    clock = Clock()
    s = StepScheduler(max_batch_size=4, clock=clock)
    s.add(entry("a", key="x", steps=4))
    s.add(entry("b", key="y", steps=4))
    order = []
    for _ in range(4):
        clock.now += 1
        order.append(run_step(s)[0].key)
    assert order == ["x", "y", "x", "y"]


def test_progress_events_per_step():
    s = StepScheduler(clock=Clock())
    s.add(entry("a", steps=3))
    seen = []
    while s.has_work():
        seen += [(e.status, e.steps_done) for e in run_step(s)[1]]
    assert seen == [(Status.RUNNING, 0), (Status.RUNNING, 1), (Status.RUNNING, 2), (Status.FINISHED, 3)]


def test_step_events_carry_the_size_of_the_batch_that_produced_them():
    s = StepScheduler(max_batch_size=4, clock=Clock())
    s.add(entry("a", steps=2))
    s.add(entry("b", steps=1))
    plan = s.schedule()
    admissions = s.drain_events()
    assert [(e.steps_done, e.batch_size) for e in admissions] == [(0, 2), (0, 2)]  # the batch they join
    events = s.update(plan)
    assert {(e.request_id, e.status, e.batch_size) for e in events} == {("a", Status.RUNNING, 2),
                                                                        ("b", Status.FINISHED, 2)}
    s.forget("b")
    _, events = run_step(s)
    assert [(e.status, e.batch_size) for e in events] == [(Status.FINISHED, 1)]
