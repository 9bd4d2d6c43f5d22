"""In-flight table: replay to late callers, compacted progress, retry semantics, cancel when the last caller leaves."""
from __future__ import annotations

import asyncio

import grpc

from instgenie.services.scheduler.flights import Flight, FlightTable
from instgenie.status import StatusInfo


def is_progress(msg) -> bool:
    return msg[0] == "progress"


async def collect(flight: Flight, q) -> list:
    return [m async for m in flight.events(q)]


def test_late_subscriber_gets_the_story_so_far_with_only_the_latest_step():
    async def main():
        f = Flight("k", b"fp", is_progress=is_progress)
        early = f.subscribe()
        for msg in [("placement",), ("progress", 1), ("progress", 2), ("progress", 3)]:
            f.publish(msg)
        late = f.subscribe()
        f.publish(("result",))
        f.finish()
        assert await collect(f, early) == [("placement",), ("progress", 1), ("progress", 2), ("progress", 3),
                                           ("result",)]
        assert await collect(f, late) == [("placement",), ("progress", 3), ("result",)]
        after = f.subscribe()  # a retry after the end replays the outcome
        assert await collect(f, after) == [("placement",), ("progress", 3), ("result",)]
    asyncio.run(main())


def test_last_caller_leaving_cancels_the_flight_but_not_earlier():
    async def main():
        f = Flight("k", b"")
        f.task = asyncio.get_running_loop().create_task(asyncio.sleep(10))
        a, b = f.subscribe(), f.subscribe()
        f.unsubscribe(a)
        await asyncio.sleep(0)
        assert not f.task.cancelled()
        f.unsubscribe(b)
        await asyncio.sleep(0)
        assert f.task.cancelled()
    asyncio.run(main())


def test_a_finished_flight_is_not_cancelled_by_its_callers_leaving():
    async def main():
        f = Flight("k", b"")
        f.task = asyncio.get_running_loop().create_task(asyncio.sleep(10))
        q = f.subscribe()
        f.finish()
        f.unsubscribe(q)
        await asyncio.sleep(0)
        assert not f.task.cancelled()
        f.task.cancel()
    asyncio.run(main())


def test_failed_flights_are_forgotten_so_a_retry_runs_again():
    table = FlightTable()
    ok, failed, running = Flight("ok", b""), Flight("bad", b""), Flight("run", b"")
    for f in (ok, failed, running):
        table.add(f)
    ok.finish()
    failed.finish(StatusInfo(grpc.StatusCode.UNAVAILABLE, "worker died"))
    assert table.get("ok") is ok
    assert table.get("bad") is None
    assert table.get("run") is running
    assert table.running() == [running]


def test_finished_flights_expire_and_are_bounded():
    now = [100.0]
    table = FlightTable(ttl=10.0, max_finished=2, clock=lambda: now[0])
    flights = [Flight(i, b"") for i in range(4)]
    for f in flights:
        table.add(f)
        f.finish()
        now[0] += 1
    table.sweep()
    assert len(table) == 2 and table.get(1) is None and table.get(3) is flights[3]
    now[0] += 8.5  # flight 2 finished 10.5 s ago (past the ttl), flight 3 9.5 s ago
    table.sweep()
    assert table.get(2) is None and table.get(3) is flights[3]
    now[0] += 1
    table.sweep()
    assert len(table) == 0


def test_a_retry_that_replaces_a_flight_is_not_dropped_by_the_old_one_ending():
    table = FlightTable()
    old, new = Flight("k", b""), Flight("k", b"")
    table.add(old)
    table.add(new)
    old.finish(StatusInfo(grpc.StatusCode.UNAVAILABLE, "worker died"))
    assert table.get("k") is new and table.running() == [new]
    new.finish()
    assert table.get("k") is new and table.running() == []


def test_running_and_sweep_do_not_walk_the_finished_flights():
    table = FlightTable(max_finished=100_000)
    for i in range(20_000):
        f = Flight(i, b"")
        table.add(f)
        f.finish()
    live = Flight("live", b"")
    table.add(live)
    assert table.running() == [live] and len(table) == 20_001
    assert len(table._running) == 1  # the structure admission reads holds only what runs
