"""Worker registry: leases, re-registration, draining, and load views merging tracked and reported work."""
from __future__ import annotations

from instgenie.scheduler.v1 import scheduler_service_pb2 as spb
from instgenie.services.scheduler.registry import Registry, Tracked
from instgenie.worker.v1 import worker_service_pb2 as wpb


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def info(wid="w1", model="m", address="127.0.0.1:1"):
    return spb.WorkerInfo(worker_id=wid, address=address, max_batch_size=4, model=wpb.ModelInfo(
        model_id=model, image_tokens=64, text_tokens=1, hidden=64, dual_blocks=1, single_blocks=1, in_channels=4,
        out_channels=4, branches=2))


def test_lease_expiry_and_reports():
    clock = Clock()
    reg = Registry(lease=3.0, clock=clock)
    reg.register(info("a"), wpb.WorkerLoad())
    reg.register(info("b"), wpb.WorkerLoad())
    clock.t += 2.0
    reg.report("a", wpb.WorkerLoad())
    clock.t += 2.0
    assert [r.worker_id for r in reg.expire()] == ["b"]
    assert sorted(reg.workers) == ["a"]
    try:
        reg.report("b", wpb.WorkerLoad())
    except KeyError:
        pass
    else:
        raise AssertionError("a retired worker's report must be refused so that it registers again")


def test_draining_and_other_models_are_not_placed_on():
    reg = Registry()
    reg.register(info("a", "m"), wpb.WorkerLoad())
    reg.register(info("b", "m"), wpb.WorkerLoad(draining=True))
    reg.register(info("c", "other"), wpb.WorkerLoad())
    assert [v.worker_id for v in reg.views("m")] == ["a"]
    assert [v.worker_id for v in reg.views("m", exclude={"a"})] == []


def test_view_merges_tracked_and_reported_work_without_double_counting():
    reg = Registry(capacity_per_slot=2)
    load = wpb.WorkerLoad(resident_templates=["t1"], loading_templates=["t2"])
    load.running.add(request_id="mine", tokens=20, steps_done=5, total_steps=20)
    load.running.add(request_id="old", tokens=40, steps_done=10, total_steps=20)  # placed before a restart
    load.waiting.add(request_id="q", tokens=8, steps_done=0, total_steps=20)
    reg.register(info("a"), load)
    reg.track("a", Tracked("mine", "t1", tokens=10, total_steps=20, steps_done=6, started=True))
    reg.track("a", Tracked("new", "t2", tokens=3, total_steps=20))
    v = reg.views("m")[0]
    # tracked work is exact (per branch tokens); reported tokens cover both branches and are halved
    assert sorted((w.tokens, w.steps_left) for w in v.running) == [(10, 14), (20, 10)]
    assert sorted((w.tokens, w.steps_left) for w in v.waiting) == [(3, 20), (4, 20)]
    assert v.resident == {"t1"} and v.loading == {"t2"}
    assert v.capacity == 8 and v.in_flight == 4
    reg.untrack("a", "new")
    assert reg.views("m")[0].in_flight == 3


def test_reregistration_keeps_tracked_work():
    reg = Registry()
    reg.register(info("a"), wpb.WorkerLoad())
    reg.track("a", Tracked("r", "t", 1, 10))
    reg.register(info("a"), wpb.WorkerLoad())
    assert "r" in reg.get("a").tracked
