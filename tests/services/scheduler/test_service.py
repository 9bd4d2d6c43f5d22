"""The scheduler service with fake workers over real gRPC on loopback: profiles in, predictions checked against
measured finishes, the policy switched at run time, dead workers skipped, popular templates warmed."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import grpc
import pytest

from instgenie.scheduler.v1 import scheduler_service_pb2 as spb
from instgenie.scheduler.v1 import scheduler_service_pb2_grpc as spb_grpc
from instgenie.services.scheduler.__main__ import parse_args
from instgenie.services.scheduler.placement import make_policy
from instgenie.services.scheduler.profile import Profile, Transfer, load_profiles
from instgenie.services.scheduler.service import SchedulerConfig, SchedulerService
from instgenie.worker.v1 import worker_service_pb2 as wpb
from instgenie.worker.v1 import worker_service_pb2_grpc as wpb_grpc

MODEL = wpb.ModelInfo(model_id="m", image_tokens=64, text_tokens=4, hidden=32, dual_blocks=1, single_blocks=1,
                      in_channels=4, out_channels=4, branches=1, default_steps=4)
STEP = 0.01  # seconds per fake denoising step


def profile(**kw) -> Profile:
    # Every step 10 ms (a = 0): what the fake workers do, so predictions can be checked exactly.
    base = dict(model_id="m", device_kind="cpu", compute_a=0.0, compute_b=STEP, compute_r2=1.0,
                store_to_host=Transfer(1e9, 0.0))
    return Profile(**{**base, **kw})


class FakeWorker(wpb_grpc.WorkerServiceServicer):
    """Streams started, one progress per step (STEP x slowdown apart), then a result; records warm calls."""

    def __init__(self, slowdown: float = 1.0):
        self.slowdown = slowdown
        self.edits: list[str] = []
        self.warmed: list[str] = []

    async def Edit(self, request, context):
        self.edits.append(request.request_id)
        steps = request.steps
        yield wpb.EditResponse(request_id=request.request_id, started=wpb.EditResponse.Started(batch_size=1))
        for s in range(1, steps + 1):
            await asyncio.sleep(STEP * self.slowdown)
            yield wpb.EditResponse(request_id=request.request_id,
                                   progress=wpb.EditResponse.Progress(step=s, total_steps=steps, batch_size=1))
        yield wpb.EditResponse(request_id=request.request_id, result=wpb.EditResult(mime_type="image/png"))

    async def WarmTemplate(self, request, context):
        self.warmed.append(request.template_id)
        return wpb.WarmTemplateResponse()

    async def ForgetTemplate(self, request, context):
        return wpb.ForgetTemplateResponse()


@contextlib.asynccontextmanager
async def serving(servicer, add):
    server = grpc.aio.server()
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", server
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def cluster(workers: dict[str, FakeWorker], profiles=(), policy="predicted-finish", announce=True, **config):
    """A scheduler and fake workers, each registered (announcing the first profile) with an empty load."""
    cfg = SchedulerConfig(report_interval=0.05, lease=5.0, **config)
    service = SchedulerService(cfg, make_policy(policy, affinity_slack=cfg.affinity_slack), profiles=profiles)
    async with contextlib.AsyncExitStack() as stack:
        address, _ = await stack.enter_async_context(serving(service, spb_grpc.add_SchedulerServiceServicer_to_server))
        service.start()
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
        stub = spb_grpc.SchedulerServiceStub(channel)
        servers = {}
        for wid, fake in workers.items():
            waddr, server = await stack.enter_async_context(serving(fake, wpb_grpc.add_WorkerServiceServicer_to_server))
            servers[wid] = server
            info = spb.WorkerInfo(worker_id=wid, address=waddr, model=MODEL, max_batch_size=4, device="cpu",
                                  profile=profiles[0].profile_id if profiles and announce else "")
            await stub.RegisterWorker(spb.RegisterWorkerRequest(worker=info, load=wpb.WorkerLoad()))
        try:
            yield service, stub, servers
        finally:
            await service.close()


def edit_request(i: int, template: str = "t", steps: int = 4) -> spb.EditRequest:
    return spb.EditRequest(edit=wpb.EditRequest(request_id=f"r{i}", template_id=template, steps=steps), tenant="x",
                           model="m",
                           masked_tokens=8, cache_bytes=0, steps=steps)


async def run_edit(stub, i: int, **kw) -> list:
    return [m async for m in stub.Edit(edit_request(i, **kw))]


def test_a_profile_file_reaches_the_scheduler_and_predicts_the_workers_announcing_it(tmp_path):
    path = profile().save(tmp_path / "m@cpu.json")
    args = parse_args(["--profile", str(tmp_path)])
    profiles = load_profiles(args.profile)
    assert [p.profile_id for p in profiles] == [profile().profile_id]

    async def main():
        async with cluster({"w1": FakeWorker()}, profiles) as (service, stub, _):
            status = await stub.GetClusterStatus(spb.GetClusterStatusRequest())
            assert status.workers[0].cost_model == f"profile {Profile.load(path).profile_id} (announced)"
            events = await run_edit(stub, 1)
            placement = events[0].placement
            # Idle worker, resident-or-free template: 4 steps of 10 ms, no pre/post-processing.
            assert placement.worker_id == "w1" and placement.predicted_seconds == pytest.approx(4 * STEP)
            status = await stub.GetClusterStatus(spb.GetClusterStatusRequest())
            stats = status.workers[0].prediction
            assert stats.edits == 1 and status.prediction.edits == 1
            # Measured includes the hops and the asyncio sleeps' lateness: never faster than predicted.
            assert stats.mean_error_seconds > 0 and 0 < stats.mean_abs_relative_error < 1
            assert status.placed_cold == 1 and status.placed_resident == 0

    asyncio.run(main())


def test_a_worker_slower_than_its_profile_is_corrected_online():
    async def main():
        async with cluster({"slow": FakeWorker(slowdown=3.0)}, [profile()]) as (service, stub, _):
            for i in range(6):
                await run_edit(stub, i, steps=8)
            speed = (await stub.GetClusterStatus(spb.GetClusterStatusRequest())).workers[0].prediction.speed
            # 30 ms steps against a 10 ms profile, plus event latency: the speed sits near 3, never near 1.
            assert 2.5 < speed < 6.0
            events = await run_edit(stub, 99, steps=8)
            assert events[0].placement.predicted_seconds == pytest.approx(8 * STEP * speed)

    asyncio.run(main())


def test_policy_switch_by_config_and_statistics_reset():
    async def main():
        workers = {"a": FakeWorker(), "b": FakeWorker()}
        async with cluster(workers, [profile()], policy="least-requests") as (service, stub, _):
            status = await stub.GetClusterStatus(spb.GetClusterStatusRequest())
            assert status.placement_policy == "least-requests"
            assert set(status.placement_policies) == {"predicted-finish", "least-requests", "least-masked-tokens",
                                                      "round-robin"}
            await run_edit(stub, 0)
            resp = await stub.ConfigurePlacement(spb.ConfigurePlacementRequest(policy="round-robin",
                                                                                reset_statistics=True))
            assert resp.policy == "round-robin"
            status = await stub.GetClusterStatus(spb.GetClusterStatusRequest())
            assert status.placement_policy == "round-robin" and status.prediction.edits == 0
            assert status.placed_cold == 0 and status.edits_placed == 1  # admission counters are kept
            placed = [(await run_edit(stub, i))[0].placement.worker_id for i in range(1, 5)]
            assert placed == ["a", "b", "a", "b"]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ConfigurePlacement(spb.ConfigurePlacementRequest(policy="fastest"))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (await stub.ConfigurePlacement(spb.ConfigurePlacementRequest())).policy == "round-robin"

    asyncio.run(main())


def test_the_worker_holding_the_template_is_chosen():
    async def main():
        workers = {"a": FakeWorker(), "b": FakeWorker()}
        async with cluster(workers, [profile()]) as (service, stub, _):
            await stub.ReportLoad(spb.ReportLoadRequest(worker_id="b", load=wpb.WorkerLoad(resident_templates=["t"])))
            events = await run_edit(stub, 1)
            assert events[0].placement.worker_id == "b"
            status = await stub.GetClusterStatus(spb.GetClusterStatusRequest())
            assert status.placed_resident == 1

    asyncio.run(main())


def test_a_full_worker_is_skipped_even_when_it_holds_the_template():
    async def main():
        workers = {"a": FakeWorker(), "b": FakeWorker()}
        # Capacity = max batch 4 x 1 slot: four running requests fill "a".
        async with cluster(workers, [profile()], capacity_per_slot=1) as (service, stub, _):
            busy = [wpb.RequestLoad(request_id=f"x{i}", tokens=8, total_steps=4) for i in range(4)]
            await stub.ReportLoad(spb.ReportLoadRequest(worker_id="a", load=wpb.WorkerLoad(
                running=busy, resident_templates=["t"])))
            events = await run_edit(stub, 1)
            assert events[0].placement.worker_id == "b" and workers["a"].edits == []

    asyncio.run(main())


def test_a_dead_worker_is_never_chosen_again():
    async def main():
        workers = {"a": FakeWorker(), "b": FakeWorker()}
        async with cluster(workers, [profile()], policy="round-robin") as (service, stub, servers):
            await servers["a"].stop(None)  # "a" dies without a word
            placed = []
            for i in range(4):
                events = await run_edit(stub, i)
                assert events[-1].worker_event.WhichOneof("event") == "result"
                placed += [e.placement.worker_id for e in events if e.WhichOneof("event") == "placement"]
            # At most the first edit tried "a" (transport failure: retired, placed again on "b").
            assert placed[-3:] == ["b", "b", "b"] and workers["a"].edits == []
            status = await stub.GetClusterStatus(spb.GetClusterStatusRequest())
            assert [w.worker.worker_id for w in status.workers] == ["b"]

    asyncio.run(main())


def test_a_popular_template_is_warmed_on_another_worker():
    async def main():
        workers = {"a": FakeWorker(), "b": FakeWorker()}
        async with cluster(workers, [profile()], warm_templates=True) as (service, stub, _):
            await stub.ReportLoad(spb.ReportLoadRequest(worker_id="a", load=wpb.WorkerLoad(
                resident_templates=["hot"], host_cache_budget_bytes=10**9)))
            await stub.ReportLoad(spb.ReportLoadRequest(worker_id="b", load=wpb.WorkerLoad(
                host_cache_budget_bytes=10**9)))
            for i in range(6):  # all the traffic is "hot": two workers' worth of share
                await run_edit(stub, i, template="hot")
            for _ in range(100):
                if workers["b"].warmed:
                    break
                await asyncio.sleep(0.02)
            assert workers["b"].warmed == ["hot"] and workers["a"].warmed == []
            assert (await stub.GetClusterStatus(spb.GetClusterStatusRequest())).templates_warmed == 1

    asyncio.run(main())


def test_without_a_profile_the_policy_default_predicts():
    async def main():
        async with cluster({"w": FakeWorker()}, [], policy="least-masked-tokens") as (service, stub, _):
            status = await stub.GetClusterStatus(spb.GetClusterStatusRequest())
            assert status.workers[0].cost_model == "policy default"
            events = await run_edit(stub, 1)
            assert events[0].placement.predicted_seconds > 0  # analytical, whatever the policy

    asyncio.run(main())


def test_a_profile_of_the_same_model_and_device_is_used_when_none_is_announced():
    async def main():
        other = dataclasses.replace(profile(), compute_b=0.02)
        async with cluster({"w": FakeWorker()}, [other], announce=False) as (service, stub, _):
            status = await stub.GetClusterStatus(spb.GetClusterStatusRequest())
            assert "model and device kind" in status.workers[0].cost_model

    asyncio.run(main())
