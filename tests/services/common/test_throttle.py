"""The object-store read cap: reads share one link of the set rate, first come first served; the rest passes through."""
from __future__ import annotations

import threading
import time

import pytest

from instgenie.services.common.objectstore import LocalObjectStore, ObjectNotFound
from instgenie.services.common.throttle import ThrottledStore


class FakeTime:
    """A clock that only moves when someone sleeps: the pacing arithmetic without wall-clock flakiness."""

    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def inner(tmp_path):
    store = LocalObjectStore(tmp_path / "store")
    store.put("a", b"x" * 1000)
    store.put("b", b"y" * 3000)
    return store


def test_reads_are_paced_to_the_rate_one_after_another(inner):
    t = FakeTime()
    store = ThrottledStore(inner, 1000.0, clock=t.clock, sleep=t.sleep)  # 1000 bytes/s
    assert store.get("a") == b"x" * 1000
    assert t.now == pytest.approx(1.0)
    assert store.get_range("b", 1000, 2000) == b"y" * 2000
    assert t.now == pytest.approx(3.0)
    assert store.bytes_read == 3000 and store.seconds_waited == pytest.approx(3.0)


def test_a_read_queues_behind_the_bytes_still_on_the_link(inner):
    t = FakeTime()
    store = ThrottledStore(inner, 1000.0, clock=t.clock, sleep=lambda s: None)  # nobody waits: a second reader
    store.get("b")  # occupies the link until t = 3
    t.now = 1.0
    store.get("a")  # starts when the link frees up: done at 4, not at 2
    assert store._free_at == pytest.approx(4.0)
    t.now = 10.0  # an idle link does not bank credit
    store.get("a")
    assert store._free_at == pytest.approx(11.0)


def test_concurrent_readers_share_the_rate_on_a_real_clock(inner):
    store = ThrottledStore(inner, 20_000.0)  # 4 reads of 1000 bytes: 0.2 s on the link together
    start = time.monotonic()
    threads = [threading.Thread(target=store.get, args=("a",)) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert time.monotonic() - start >= 0.19  # would be ~0.05 if each reader had the rate to itself
    assert store.bytes_read == 4000


def test_everything_but_reads_passes_straight_through(inner):
    t = FakeTime()
    store = ThrottledStore(inner, 1.0, clock=t.clock, sleep=t.sleep)
    store.put("c", b"zz", {"kind": "test"})
    assert store.stat("c").size == 2 and store.stat("c").metadata == {"kind": "test"}
    assert list(store.list("")) == ["a", "b", "c"] and store.exists("c")
    store.delete("c")
    store.delete_prefix("b")
    assert list(store.list("")) == ["a"]
    assert t.sleeps == []  # none of that waited on the cap
    with pytest.raises(ObjectNotFound):
        store.get("missing")


@pytest.mark.parametrize("rate", [0, -1.0, float("nan")])
def test_a_rate_that_is_not_positive_is_refused(inner, rate):
    with pytest.raises(ValueError, match="bytes_per_second"):
        ThrottledStore(inner, rate)
