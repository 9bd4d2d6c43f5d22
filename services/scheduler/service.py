"""The scheduler's gRPC service: worker registry, bounded admission, placement, and forwarding to workers.

Edits and registrations are placed the moment they arrive (the chosen worker starts prefetching the
template's cache while the request waits) and their worker's event stream is forwarded to the caller. If the
worker dies or refuses (draining) before answering, the request is placed again on another worker, as long as
its deadline allows; otherwise the caller gets UNAVAILABLE with what happened. Every wait is bounded by the
caller's deadline, and a caller that goes away cancels the work on the worker.

Every placed edit's prediction is checked against when its result passes through, per worker, and its step
events feed the worker's speed correction (registry.py, predictions.py). Template heat is observed on every
edit, and a background round asks workers to warm hot templates that too few of them hold (templates.py).

Telemetry (metrics.py, ../common/telemetry.py): the trace context of the call that created a flight is kept on
the flight and is the parent of its `scheduler.flight` span, whoever follows the flight later; the calls to
workers are children of that span, so a trace runs gateway -> scheduler -> worker through the queue.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
from opentelemetry import context as otel_context

from instgenie.scheduler.v1 import scheduler_service_pb2 as pb
from instgenie.scheduler.v1 import scheduler_service_pb2_grpc as pb_grpc
from instgenie.status import StatusInfo
from instgenie.worker.v1 import worker_service_pb2 as wpb
from instgenie.worker.v1 import worker_service_pb2_grpc as wpb_grpc

from ..common.logs import request_id_var
from ..common.server import channel_options
from ..common.status import ServiceError, abort, invalid, is_transport_failure, rpc, status_of
from ..common.telemetry import end_stream, span_event, tracer
from .costmodel import AnalyticalCostModel
from .flights import Flight, FlightTable
from .metrics import SchedulerMetrics
from .placement import POLICIES, PlacementPolicy, PlacementRequest, PredictedFinish, make_policy, predict_finish
from .predictions import summarise
from .registry import Registry, Tracked
from .requests import check_tokens, fingerprint
from .templates import TemplateHeat, WarmPlanner

log = logging.getLogger(__name__)

UNAVAILABLE, EXHAUSTED = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass
class SchedulerConfig:
    report_interval: float = 0.5
    lease: float = 3.0
    #: edits + registrations admitted and not answered, over the whole cluster
    max_in_flight: int = 256
    #: a worker holds at most max_batch_size * this many requests
    capacity_per_slot: int = 4
    #: placements per request (first + re-placements after a worker failed)
    max_attempts: int = 3
    #: when a caller sets no deadline
    default_deadline: float = 600.0
    #: finished edits kept to answer retries with the same request id
    result_ttl: float = 600.0
    #: ask workers to warm hot templates that too few of them hold
    warm_templates: bool = True
    #: scale each worker's predicted step times by its measured speed
    correction: bool = True
    #: predicted-finish: a worker holding the template wins when within this share of the best prediction
    affinity_slack: float = 0.25


@dataclass
class Counters:
    placed: int = 0
    replaced: int = 0
    rejected: int = 0
    #: first placements of edits by where the template was on the chosen worker
    resident: int = 0
    loading: int = 0
    cold: int = 0
    warmed: int = 0


def _connect(address: str):
    channel = grpc.aio.insecure_channel(address, options=channel_options())
    return channel, wpb_grpc.WorkerServiceStub(channel)


def _is_progress(msg) -> bool:
    return msg.WhichOneof("event") == "worker_event" and msg.worker_event.WhichOneof("event") == "progress"


class SchedulerService(pb_grpc.SchedulerServiceServicer):
    def __init__(self, config: SchedulerConfig, policy: PlacementPolicy | None = None, connect=_connect,
                 profiles=()):
        self.config = config
        self.policy = policy or PredictedFinish(affinity_slack=config.affinity_slack)
        #: predicts workers without a profile of their own, whatever the policy
        self.default_cost = getattr(self.policy, "cost", None) or AnalyticalCostModel()
        self.registry = Registry(lease=config.lease, capacity_per_slot=config.capacity_per_slot, connect=connect,
                                 profiles=list(profiles), correction=config.correction)
        self.registry.default_cost = self.default_cost
        self.flights = FlightTable(ttl=config.result_ttl)
        self.registrations: set[asyncio.Task] = set()
        self.counters = Counters()
        self.heat = TemplateHeat()
        self.planner = WarmPlanner()
        self._expiry: asyncio.Task | None = None
        self._warming: asyncio.Task | None = None
        self._warm_calls: set[asyncio.Task] = set()
        self.metrics = SchedulerMetrics(self)

    # ---------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._expiry = loop.create_task(self._expire_loop())
        if self.config.warm_templates:
            self._warming = loop.create_task(self._warm_loop())

    async def close(self) -> None:
        for task in (self._expiry, self._warming, *self._warm_calls):
            if task:
                task.cancel()
        for flight in self.flights.running():
            flight.task and flight.task.cancel()
        for record in list(self.registry.workers.values()):
            if record.channel is not None:
                await record.channel.close()

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.lease / 3)
            for record in self.registry.expire():
                await self._close_channel(record.channel)
            self.flights.sweep()

    @staticmethod
    async def _close_channel(channel) -> None:
        if channel is not None:
            await channel.close(grace=None)

    # ----------------------------------------------------------------------------------- registry
    @rpc
    async def RegisterWorker(self, request, context):
        w = request.worker
        if not w.worker_id or not w.address or not w.model.model_id:
            raise invalid("worker", "worker_id, address and model.model_id are required")
        _, stale = self.registry.register(w, request.load)
        for channel in stale:
            await self._close_channel(channel)
        resp = pb.RegisterWorkerResponse()
        resp.report_interval.FromMilliseconds(int(self.config.report_interval * 1000))
        resp.lease.FromMilliseconds(int(self.config.lease * 1000))
        return resp

    @rpc
    async def ReportLoad(self, request, context):
        try:
            self.registry.report(request.worker_id, request.load)
        except KeyError:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"worker {request.worker_id!r} is not registered; "
                               "register again", reason="WORKER_NOT_REGISTERED") from None
        return pb.ReportLoadResponse()

    @rpc
    async def DeregisterWorker(self, request, context):
        record = self.registry.retire(request.worker_id, "deregistered (draining)")
        if record is not None:
            await self._close_channel(record.channel)
        return pb.DeregisterWorkerResponse()

    # ------------------------------------------------------------------------- Kubernetes discovery
    def pod_gone(self, name: str) -> None:
        """Discovery (on this loop): the pod of worker `name` is not ready (terminating, evicted, failing). It gets
        no new work at once, without waiting for its lease; what runs there goes on (a draining worker finishes
        it). Its lease, or its own deregistration, retires it."""
        self.registry.unready.add(name)
        record = self.registry.get(name)
        if record is not None:
            record.touch()
            log.info("worker %s: its pod is not ready (Kubernetes); no new work goes there", name)

    def pod_ready(self, name: str, address: str) -> None:
        """Discovery: the pod of worker `name` is ready at `address`; a hint only (workers register themselves)."""
        self.registry.unready.discard(name)
        record = self.registry.get(name)
        if record is not None:
            record.touch()
        if record is None or record.info.address != address:
            log.info("worker pod %s ready at %s%s", name, address,
                     "" if record is not None else "; placed on once it registers")

    # ---------------------------------------------------------------------------------- admission
    def _admit(self) -> None:
        in_flight = len(self.flights.running()) + len(self.registrations)
        if in_flight >= self.config.max_in_flight:
            self.counters.rejected += 1
            self.metrics.rejections.add(1, {"reason": "CLUSTER_FULL"})
            raise ServiceError(EXHAUSTED, f"the cluster has {in_flight} requests in flight, its limit; retry "
                               "shortly", reason="CLUSTER_FULL", retry_after=self._retry_hint())

    def _admit_tenant(self, tenant: str, limit: int) -> None:
        if limit <= 0:
            return
        mine = sum(1 for f in self.flights.running() if f.key[0] == tenant)
        if mine >= limit:
            self.counters.rejected += 1
            self.metrics.rejections.add(1, {"reason": "TENANT_LIMIT"})
            raise ServiceError(EXHAUSTED, f"tenant {tenant!r} has {mine} edits in flight, its limit; wait for one "
                               "to finish", reason="TENANT_LIMIT", retry_after=self._retry_hint())

    def _retry_hint(self) -> float:
        """Seconds until some worker is likely to free a slot: its shortest running request's remaining steps."""
        best = None
        for record in self.registry.live():
            view = self.registry.view(record)
            if not view.running:
                continue
            step = (view.cost or self.default_cost).step_seconds(view.shape, [w.tokens for w in view.running],
                                                                 image_tokens=[w.image_tokens for w in view.running])
            eta = min(w.steps_left for w in view.running) * step
            best = eta if best is None else min(best, eta)
        return max(0.5, min(best if best is not None else 1.0, 30.0))

    def _place(self, req: PlacementRequest, exclude: set[str]):
        """(choice, record, tier): the policy's worker, with a prediction from that worker's cost model even when
        the policy makes none, and where the template's cache is on it."""
        if not self.registry.live(req.model_id):
            served = sorted({w.model_id for w in self.registry.live()})
            raise ServiceError(UNAVAILABLE, f"no worker serves model {req.model_id!r} right now (serving: "
                               f"{served or 'nothing'}); retry when one has started", reason="NO_WORKER",
                               retry_after=2.0)
        views = self.registry.views(req.model_id, exclude)
        choice = self.policy.choose(req, views)
        if choice is None:
            self.counters.rejected += 1
            self.metrics.rejections.add(1, {"reason": "WORKERS_FULL" if views else "NO_WORKER_LEFT"})
            if not views:
                raise ServiceError(UNAVAILABLE, f"every worker serving {req.model_id!r} failed this request",
                                   reason="NO_WORKER_LEFT")
            raise ServiceError(EXHAUSTED, f"every worker serving {req.model_id!r} is full; retry shortly",
                               reason="WORKERS_FULL", retry_after=self._retry_hint())
        view = next(v for v in views if v.worker_id == choice.worker_id)
        predicted = choice.predicted_seconds or predict_finish(view, req, self.default_cost)
        tier = "host" if req.template_id in view.resident else "loading" if req.template_id in view.loading \
            else "store"
        return predicted, self.registry.get(choice.worker_id), tier

    # -------------------------------------------------------------------------------------- edits
    @rpc
    async def Edit(self, request, context):
        e = request.edit
        request_id_var.set(e.request_id or "-")
        for name, value in (("edit.request_id", e.request_id), ("edit.template_id", e.template_id),
                            ("model", request.model)):
            if not value:
                raise invalid(name, f"{name} is required")
        if request.steps <= 0:
            raise invalid("steps", "steps must be the template's step count (> 0)")
        check_tokens(request.masked_tokens, request.image_tokens)
        key = (request.tenant, e.request_id)
        digest = fingerprint(request)
        flight = self.flights.get(key)
        if flight is not None and flight.fingerprint != digest:
            raise ServiceError(grpc.StatusCode.ALREADY_EXISTS, f"request id {e.request_id!r} was already used for "
                               "a different edit; use a new request id", reason="REQUEST_ID_REUSED",
                               field="request_id")
        if flight is None:
            self._admit()
            self._admit_tenant(request.tenant, request.tenant_max_in_flight)
            flight = Flight(key, digest, is_progress=_is_progress)
            flight.trace_context = otel_context.get_current()
            remaining = context.time_remaining()
            deadline = time.monotonic() + (remaining if remaining is not None else self.config.default_deadline)
            flight.task = asyncio.get_running_loop().create_task(self._run_edit(flight, request, deadline))
            self.flights.add(flight)
        else:
            span_event("flight.joined", done=flight.done, worker=flight.worker_id)
        queue = flight.subscribe()
        try:
            async for msg in flight.events(queue):
                yield msg
        finally:
            flight.unsubscribe(queue)
        if flight.error is not None:
            await abort(context, flight.error)

    async def _run_edit(self, flight: Flight, request, deadline: float) -> None:
        e = request.edit
        request_id_var.set(e.request_id)
        mode = request.cache_mode or "kv"
        size = int(request.image_tokens)  # the template's own token count: FLOPs are counted at its size
        place = PlacementRequest(request.model, e.template_id, int(request.masked_tokens), int(request.steps),
                                 int(request.cache_bytes), mode, size)
        self.heat.observe(e.template_id, request.model, int(request.cache_bytes))

        async def call(record, remaining, predicted, tier):
            cost = record.cost or self.default_cost
            tracked = Tracked(e.request_id, e.template_id, int(request.masked_tokens), int(request.steps),
                              flops=cost.request_flops(record.shape, int(request.masked_tokens), mode, size),
                              mode=mode, placed_at=time.monotonic(), cache_bytes=int(request.cache_bytes),
                              predicted=predicted, tier=tier, image_tokens=size)
            self.registry.track(record.worker_id, tracked)
            try:
                stream = record.stub.Edit(e, timeout=remaining)
                try:
                    async for ev in stream:
                        kind = ev.WhichOneof("event")
                        if kind == "started":
                            now = time.monotonic()
                            if tracked.started_at is None:
                                self.metrics.queue.record(now - flight.created, {"model": request.model})
                            self.registry.started(record, tracked, now)
                            span_event("worker.started", worker=record.worker_id,
                                       batch_size=ev.started.batch_size, cache_tier=ev.started.cache_tier)
                        elif kind == "progress":
                            self.registry.stepped(record, tracked, ev.progress.step, time.monotonic(),
                                                  ev.progress.total_steps)
                        flight.publish(pb.EditResponse(worker_event=ev))
                        if kind == "result":
                            now = time.monotonic()
                            self.registry.answered(record, tracked, now)
                            self._observe_result(request.model, tracked, now)
                            return True
                finally:
                    await end_stream(stream)
                return False
            finally:
                self.registry.untrack(record.worker_id, e.request_id)

        attributes = {"instgenie.request_id": e.request_id, "instgenie.template_id": e.template_id,
                      "instgenie.model": request.model, "instgenie.masked_tokens": int(request.masked_tokens),
                      "instgenie.steps": int(request.steps)}
        try:
            with tracer().start_as_current_span("scheduler.flight", context=flight.trace_context,
                                                attributes=attributes):
                await self._run(flight, place, deadline, call, pb.EditResponse)
        finally:
            status = flight.error.code.name if flight.error is not None else "OK" if flight.done else "CANCELLED"
            self.metrics.requests.add(1, {"model": request.model, "status": status})

    def _observe_result(self, model: str, tracked: Tracked, now: float) -> None:
        labels = {"model": model}
        if tracked.started_at is not None:
            self.metrics.inference.record(now - tracked.started_at, labels)
        if tracked.predicted > 0:
            actual = now - tracked.placed_at
            error = actual - tracked.predicted
            self.metrics.abs_error.record(abs(error), labels)
            self.metrics.late.add(max(0.0, error), labels)  # both, so that both series exist
            self.metrics.early.add(max(0.0, -error), labels)
            self.metrics.relative_error.record(abs(actual - tracked.predicted) / tracked.predicted, labels)

    async def _run(self, flight: Flight, place: PlacementRequest, deadline: float, call, response_type) -> None:
        """Place, call, and place again on another worker while the failure is the worker's and time is left."""
        exclude: set[str] = set()
        last: StatusInfo | None = None
        try:
            for attempt in range(1, self.config.max_attempts + 1):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                predicted, record, tier = self._place(place, exclude)
                self.counters.placed += 1
                if attempt > 1:
                    self.counters.replaced += 1
                elif flight.kind == "edit":
                    attr = {"host": "resident", "loading": "loading"}.get(tier, "cold")
                    setattr(self.counters, attr, getattr(self.counters, attr) + 1)
                flight.worker_id = record.worker_id
                self.metrics.placements.add(1, {"kind": flight.kind, "tier": tier, "replacement": attempt > 1})
                span_event("placed", worker=record.worker_id, predicted_seconds=predicted, attempt=attempt, tier=tier)
                flight.publish(response_type(placement=pb.Placement(
                    worker_id=record.worker_id, predicted_seconds=predicted, attempt=attempt)))
                try:
                    if await call(record, remaining, predicted, tier):
                        flight.finish()
                        return
                    last = StatusInfo(UNAVAILABLE, f"worker {record.worker_id} ended the stream without a result")
                except grpc.aio.AioRpcError as exc:
                    last = status_of(exc)
                    if not self._worker_failed(record, last):
                        flight.finish(last)
                        return
                exclude.add(record.worker_id)
                span_event("worker.failed", worker=record.worker_id, code=last.code.name, message=last.message)
                log.warning("%s %s failed on worker %s (%s: %s); placing it again", flight.kind, flight.key[1],
                            record.worker_id, last.code.name, last.message)
            if time.monotonic() >= deadline:
                flight.finish(StatusInfo(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before a worker "
                                         "could finish the request" + (f" (last failure: {last.message})" if last else ""),
                                         "DEADLINE_EXCEEDED"))
            else:
                flight.finish(StatusInfo(UNAVAILABLE, f"the request failed on {len(exclude)} workers; last: "
                                         f"{last.message if last else 'unknown'}", "WORKERS_FAILED", retry_after=1.0))
        except asyncio.CancelledError:
            flight.finish(StatusInfo(grpc.StatusCode.CANCELLED, "cancelled by the client", "CANCELLED"))
            raise
        except ServiceError as exc:
            flight.finish(exc.info)
        except Exception as exc:  # noqa: BLE001 - a bug in here must still answer the caller
            log.exception("%s %s failed", flight.kind, flight.key[1])
            flight.finish(StatusInfo(grpc.StatusCode.INTERNAL, f"scheduler error: {type(exc).__name__}", "INTERNAL"))

    def _worker_failed(self, record, info: StatusInfo) -> bool:
        """True when the failure is the worker's (dead, unreachable, draining): worth another worker."""
        if is_transport_failure(info):
            self.registry.retire(record.worker_id, f"call failed at the transport level: {info.message}")
            asyncio.get_running_loop().create_task(self._close_channel(record.channel))
            return True
        return info.code == UNAVAILABLE and info.reason in ("DRAINING", "NOT_READY")

    @rpc
    async def CancelEdit(self, request, context):
        request_id_var.set(request.request_id or "-")
        flight = self.flights.get((request.tenant, request.request_id))
        if flight is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"no edit with request id {request.request_id!r} is in "
                               "flight or recently finished", reason="REQUEST_NOT_FOUND", field="request_id")
        if flight.done:
            return pb.CancelEditResponse(outcome=wpb.CANCEL_OUTCOME_ALREADY_FINISHED)
        record = self.registry.get(flight.worker_id)
        if record is not None and record.stub is not None:
            try:
                resp = await record.stub.CancelEdit(wpb.CancelEditRequest(request_id=request.request_id),
                                                    timeout=min(5.0, context.time_remaining() or 5.0))
                if resp.outcome == wpb.CANCEL_OUTCOME_ALREADY_FINISHED:
                    return pb.CancelEditResponse(outcome=resp.outcome)
            except grpc.aio.AioRpcError as exc:
                log.info("worker cancel of %s failed (%s); cancelling here", request.request_id, exc.code().name)
        if flight.task is not None:
            flight.task.cancel()
        return pb.CancelEditResponse(outcome=wpb.CANCEL_OUTCOME_CANCELLED)

    # ------------------------------------------------------------------------------ registrations
    @rpc
    async def RegisterTemplate(self, request, context):
        r = request.registration
        request_id_var.set(r.template_id or "-")
        if not r.template_id or not request.model:
            raise invalid("registration.template_id", "registration.template_id and model are required")
        check_tokens(0, request.image_tokens)
        self._admit()
        flight = Flight(("registration", r.template_id), b"", kind="registration",
                        is_progress=lambda m: m.WhichOneof("event") == "worker_event"
                        and m.worker_event.WhichOneof("event") == "progress")
        remaining = context.time_remaining()
        deadline = time.monotonic() + (remaining if remaining is not None else self.config.default_deadline)
        served = [w for w in self.registry.live(request.model)]
        shape = served[0].shape if served else None
        size = int(request.image_tokens)  # a registration computes every token of the template
        tokens = size or (shape.image_tokens if shape else 1)
        steps = r.steps or (served[0].info.model.default_steps if served else 1)
        place = PlacementRequest(request.model, r.template_id, tokens, steps, 0, image_tokens=size)

        async def call(record, remaining, predicted, tier):
            tracked = Tracked(r.template_id, r.template_id, tokens, steps, started=True, image_tokens=size)
            self.registry.track(record.worker_id, tracked)
            try:
                stream = record.stub.RegisterTemplate(r, timeout=remaining)
                try:
                    async for ev in stream:
                        if ev.WhichOneof("event") == "progress":
                            tracked.steps_done = ev.progress.step
                            record.touch()
                        flight.publish(pb.RegisterTemplateResponse(worker_event=ev))
                        if ev.WhichOneof("event") == "registered":
                            return True
                finally:
                    await end_stream(stream)
                return False
            finally:
                self.registry.untrack(record.worker_id, r.template_id)

        flight.task = asyncio.get_running_loop().create_task(
            self._run(flight, place, deadline, call, pb.RegisterTemplateResponse))
        self.registrations.add(flight.task)
        flight.task.add_done_callback(self.registrations.discard)
        queue = flight.subscribe()
        try:
            async for msg in flight.events(queue):
                yield msg
        finally:
            flight.unsubscribe(queue)
        if flight.error is not None:
            await abort(context, flight.error)

    @rpc
    async def ForgetTemplate(self, request, context):
        calls = [w.stub.ForgetTemplate(wpb.ForgetTemplateRequest(template_id=request.template_id), timeout=5.0)
                 for w in self.registry.workers.values() if w.stub is not None]
        results = await asyncio.gather(*calls, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            log.warning("%d workers did not confirm forgetting %s", len(failed), request.template_id)
        return pb.ForgetTemplateResponse()

    # ------------------------------------------------------------------------------------- views
    @rpc
    async def ListModels(self, request, context):
        models: dict[str, pb.ServedModel] = {}
        for w in self.registry.live():
            served = models.setdefault(w.model_id, pb.ServedModel(model=w.info.model))
            served.workers += 1
        return pb.ListModelsResponse(models=[models[k] for k in sorted(models)])

    @rpc
    async def GetClusterStatus(self, request, context):
        now = time.monotonic()
        records = sorted(self.registry.workers.values(), key=lambda r: r.worker_id)
        workers = [pb.WorkerStatus(worker=w.info, load=w.load, report_age_seconds=now - w.last_report,
                                   in_flight=len(w.tracked), prediction=_stats(w.accuracy.summary()),
                                   cost_model=w.cost_source)
                   for w in records]
        pairs = [p for w in records for p in w.accuracy.errors]
        speeds = [w.accuracy.speed for w in records]
        c = self.counters
        return pb.GetClusterStatusResponse(
            workers=workers, in_flight=len(self.flights.running()) + len(self.registrations),
            max_in_flight=self.config.max_in_flight, placement_policy=self.policy.name,
            edits_placed=c.placed, edits_replaced=c.replaced, edits_rejected=c.rejected,
            prediction=_stats(summarise(pairs, sum(speeds) / len(speeds) if speeds else 1.0)),
            placed_resident=c.resident, placed_loading=c.loading, placed_cold=c.cold, templates_warmed=c.warmed,
            placement_policies=sorted(POLICIES))

    @rpc
    async def ConfigurePlacement(self, request, context):
        if request.policy and request.policy != self.policy.name:
            if request.policy not in POLICIES:
                raise invalid("policy", f"unknown placement policy {request.policy!r}; choose one of "
                              f"{sorted(POLICIES)}")
            self.policy = make_policy(request.policy, self.default_cost, self.config.affinity_slack)
            log.info("placement policy is now %s", self.policy.name)
        if request.reset_statistics:
            for record in self.registry.workers.values():
                record.accuracy.reset()
                record.touch()
            placed, replaced, rejected = self.counters.placed, self.counters.replaced, self.counters.rejected
            self.counters = Counters(placed, replaced, rejected)
            self.heat = TemplateHeat()
            self.planner = WarmPlanner()
        return pb.ConfigurePlacementResponse(policy=self.policy.name)

    # ---------------------------------------------------------------------------------- template warming
    async def _warm_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.report_interval)
            try:
                self._warm_round()
            except Exception:  # noqa: BLE001 - warming is an optimisation; it must never stop
                log.exception("template warming round failed")

    def _warm_round(self) -> None:
        """Ask workers to warm hot templates that too few of them hold (templates.WarmPlanner)."""
        if not isinstance(self.policy, PredictedFinish):
            return  # the comparison policies place without regard to where caches are
        records = {r.worker_id: r for r in self.registry.live()}
        views = [self.registry.view(r) for r in records.values()]

        def host_free(view, nbytes: int) -> bool:
            load = records[view.worker_id].load
            return load.host_cache_budget_bytes - load.host_cache_bytes >= nbytes

        for action in self.planner.plan(views, self.heat.snapshot(), time.monotonic(), host_free):
            record = records[action.worker_id]
            if record.stub is None:
                continue
            task = asyncio.get_running_loop().create_task(self._warm(record, action.template_id))
            self._warm_calls.add(task)
            task.add_done_callback(self._warm_calls.discard)
            self.counters.warmed += 1

    async def _warm(self, record, template_id: str) -> None:
        try:
            await record.stub.WarmTemplate(wpb.WarmTemplateRequest(template_id=template_id), timeout=10.0)
        except grpc.aio.AioRpcError as exc:
            log.info("warming %s on %s failed: %s", template_id, record.worker_id, exc.code().name)


def _stats(s) -> pb.PredictionStats:
    return pb.PredictionStats(edits=s.edits, mean_error_seconds=s.mean_error_seconds,
                              mean_abs_error_seconds=s.mean_abs_error_seconds,
                              mean_abs_relative_error=s.mean_abs_relative_error,
                              p95_abs_relative_error=s.p95_abs_relative_error, speed=s.speed)
