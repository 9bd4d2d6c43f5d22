"""Worker registry: leases, re-registration, draining, and load views merging tracked and reported work."""
from __future__ import annotations

import pytest

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


# ------------------------------------------------------------------------------ cost models, accuracy
def _profile(model="m", device="cpu", a=1e-9):
    from instgenie.services.scheduler.profile import Profile, Transfer

    return Profile(model_id=model, device_kind=device, compute_a=a, compute_b=0.01, compute_r2=0.999,
                   store_to_host=Transfer(1e8, 0.001))


def test_each_worker_gets_the_profile_it_announces_else_one_of_its_model_and_device():
    mine, other_device = _profile(a=1e-9), _profile(device="cuda:NVIDIA H800", a=1e-12)
    reg = Registry(profiles=[mine, other_device])
    announced = info("a")
    announced.profile, announced.device = other_device.profile_id, "cuda"
    reg.register(announced, wpb.WorkerLoad())
    matched = info("b")
    matched.device = "cpu"
    reg.register(matched, wpb.WorkerLoad())
    unknown = info("c", model="other")
    unknown.profile = "other@cpu#0123456789ab"  # a profile this scheduler was not given
    reg.register(unknown, wpb.WorkerLoad())
    assert reg.get("a").cost.profile is other_device and "announced" in reg.get("a").cost_source
    assert reg.get("b").cost.profile is mine and "model and device kind" in reg.get("b").cost_source
    assert reg.get("c").cost is None and reg.get("c").cost_source == "policy default"
    assert [v.cost for v in reg.views("m")] == [reg.get("a").cost, reg.get("b").cost]


def test_a_worker_silent_past_its_lease_is_never_placed_on_even_before_it_is_retired():
    clock = Clock()
    reg = Registry(lease=3.0, clock=clock)
    reg.register(info("a"), wpb.WorkerLoad())
    reg.register(info("b"), wpb.WorkerLoad())
    clock.t += 2.5
    reg.report("a", wpb.WorkerLoad())
    clock.t += 1.0  # b's last report is 3.5 s old; the expiry sweep has not run
    assert sorted(reg.workers) == ["a", "b"]
    assert [v.worker_id for v in reg.views("m")] == ["a"]


def test_views_are_rebuilt_only_when_the_worker_changes():
    reg = Registry()
    reg.register(info("a"), wpb.WorkerLoad())
    first = reg.views("m")[0]
    assert reg.views("m")[0] is first
    item = Tracked("r", "t", tokens=4, total_steps=10)
    reg.track("a", item)
    second = reg.views("m")[0]
    assert second is not first and second.in_flight == 1
    record = reg.get("a")
    reg.started(record, item, 1.0)
    reg.stepped(record, item, 3, 1.1)
    third = reg.views("m")[0]
    assert third is not second and [(w.tokens, w.steps_left) for w in third.running] == [(4, 7)]
    reg.report("a", wpb.WorkerLoad(resident_templates=["t"]))
    assert reg.views("m")[0].resident == {"t"}


def test_step_events_measure_the_worker_against_its_profile():
    """Denoising measured at 2x the profile's time for the steps the scheduler saw: the speed converges to 2."""
    prof = _profile(a=0.0)  # every step 10 ms whatever the batch
    reg = Registry(profiles=[prof])
    reg.register(info("a"), wpb.WorkerLoad())
    record = reg.get("a")
    for i in range(30):
        item = Tracked(f"r{i}", "t", tokens=4, total_steps=10)
        reg.track("a", item)
        t = 100.0 * i
        reg.started(record, item, t)
        reg.stepped(record, item, 5, t + 0.1)   # 5 steps in 0.1 s: 20 ms each, the profile says 10
        reg.stepped(record, item, 10, t + 0.2)
        reg.untrack("a", item.request_id)
    assert record.accuracy.speed == pytest.approx(2.0, rel=1e-6)
    assert reg.views("m")[0].speed == pytest.approx(2.0, rel=1e-6)
    # Without correction the view keeps speed 1.
    assert Registry(correction=False).correction is False


def test_steps_that_ran_beside_a_template_load_do_not_teach_the_speed():
    reg = Registry(profiles=[_profile(a=0.0)])
    reg.register(info("a"), wpb.WorkerLoad(loading_templates=["x"]))
    record = reg.get("a")
    item = Tracked("r", "t", tokens=4, total_steps=10)
    reg.track("a", item)
    reg.started(record, item, 0.0)
    reg.stepped(record, item, 10, 5.0)  # very slow, but a load was in progress: a shard may have held it up
    assert item.overlapped_load and record.accuracy.speed == 1.0


def test_finish_errors_are_recorded_per_worker():
    reg = Registry()
    reg.register(info("a"), wpb.WorkerLoad())
    record = reg.get("a")
    for predicted, measured in ((1.0, 1.5), (2.0, 1.0)):
        item = Tracked("r", "t", tokens=4, total_steps=10, placed_at=10.0, predicted=predicted)
        reg.answered(record, item, 10.0 + measured)
    s = record.accuracy.summary()
    assert s.edits == 2 and s.mean_error_seconds == pytest.approx((0.5 - 1.0) / 2)
    assert s.mean_abs_relative_error == pytest.approx((0.5 / 1.5 + 1.0 / 1.0) / 2)


def test_the_link_backlog_counts_templates_being_loaded():
    reg = Registry(profiles=[_profile()])  # 100 MB/s, 1 ms per object
    reg.register(info("a"), wpb.WorkerLoad(loading_templates=["t1"]))
    reg.track("a", Tracked("r", "t2", tokens=4, total_steps=10, tier="store", cache_bytes=10_000_000))
    reg.track("a", Tracked("s", "t3", tokens=4, total_steps=10, tier="host", cache_bytes=10_000_000))
    # t2 (cold, 0.1 s + 10 objects) and t1 (loading, sized like t2); half of each is left on average.
    assert reg.views("m")[0].link_backlog == pytest.approx(2 * (0.1 + 0.01) / 2)


def test_a_worker_that_caps_its_store_reads_is_priced_at_the_cap():
    from instgenie.services.scheduler.costmodel import AnalyticalCostModel, cap_store_reads

    mine = _profile()  # store reads at 100 MB/s
    reg = Registry(profiles=[mine])
    capped, uncapped, above = info("a"), info("b"), info("c")
    capped.store_read_bytes_per_second = 25e6
    above.store_read_bytes_per_second = 1e9  # a cap above what the store gives changes nothing
    for i in (capped, uncapped, above):
        i.device = "cpu"
        reg.register(i, wpb.WorkerLoad())
    a, b, c = reg.get("a"), reg.get("b"), reg.get("c")
    assert b.cost.transfer_seconds(100_000_000) == pytest.approx(1.0 + 0.001)
    assert a.cost.transfer_seconds(100_000_000) == pytest.approx(4.0 + 0.001)
    assert a.cost.step_time(1e9, 2) == b.cost.step_time(1e9, 2)  # compute is the profile's
    assert c.cost is b.cost and "capped" not in c.cost_source
    assert "capped at 25 MB/s" in a.cost_source and "25 MB/s" in a.cost.name
    reg.register(capped, wpb.WorkerLoad())  # re-registration: the same cost model object, what was learnt kept
    assert reg.get("a").cost is a.cost and reg.get("a").accuracy is a.accuracy
    slow = cap_store_reads(AnalyticalCostModel(store_bandwidth_bytes_per_second=500e6), 50e6)
    assert slow.transfer_seconds(50_000_000) == pytest.approx(1.0 + slow.store_latency_seconds)
