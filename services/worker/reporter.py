"""Keeps the worker known to the scheduler: registers once the model is loaded, then pushes load reports.

The report is also the heartbeat. A scheduler that answers NOT_FOUND (it restarted, or retired us after a
missed lease) gets a fresh registration at once; an unreachable one is retried every interval, quietly.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import grpc

from instgenie.scheduler.v1 import scheduler_service_pb2 as spb
from instgenie.scheduler.v1 import scheduler_service_pb2_grpc as spb_grpc

from ..common.server import channel_options

log = logging.getLogger(__name__)


class Reporter:
    def __init__(self, scheduler: str, worker_info: Callable[[], spb.WorkerInfo], load: Callable[[], object],
                 interval: float = 0.5):
        self.scheduler = scheduler
        self.worker_info = worker_info
        self.load = load
        self.interval = interval
        self.registered = False
        self._wake = asyncio.Event()
        self._stopped = False
        self._channel = grpc.aio.insecure_channel(scheduler, options=channel_options())
        self._stub = spb_grpc.SchedulerServiceStub(self._channel)
        self._last_complaint = 0.0

    def poke(self) -> None:
        """Report now rather than at the next interval (e.g. draining started)."""
        self._wake.set()

    async def run(self) -> None:
        while not self._stopped:
            await self.report_once()
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def report_once(self) -> None:
        info = self.worker_info()
        try:
            if not self.registered:
                resp = await self._stub.RegisterWorker(spb.RegisterWorkerRequest(worker=info, load=self.load()),
                                                       timeout=5.0)
                self.interval = max(0.05, resp.report_interval.ToMilliseconds() / 1000) or self.interval
                self.registered = True
                log.info("registered with the scheduler at %s", self.scheduler)
            else:
                await self._stub.ReportLoad(spb.ReportLoadRequest(worker_id=info.worker_id, load=self.load()),
                                            timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                self.registered = False
                self._wake.set()
                return
            now = time.monotonic()
            if now - self._last_complaint > 30:
                log.warning("scheduler %s unreachable (%s); retrying", self.scheduler, exc.code().name)
                self._last_complaint = now
        except Exception:  # noqa: BLE001 - reporting must never take the worker down
            log.exception("load report failed")

    async def deregister(self, worker_id: str) -> None:
        self._stopped = True
        self._wake.set()
        try:
            await self._stub.DeregisterWorker(spb.DeregisterWorkerRequest(worker_id=worker_id), timeout=3.0)
        except grpc.aio.AioRpcError as exc:
            log.info("deregistration failed (%s); the lease will retire us", exc.code().name)

    async def close(self) -> None:
        self._stopped = True
        await self._channel.close()
