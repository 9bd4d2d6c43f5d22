"""One way to host a grpc.aio service: message limits, health with real readiness, reflection flag, signals.

Every InstGenIE process (gateway, scheduler, worker) runs through `ServiceHost`, so they all:
  * raise gRPC's message limits deliberately (images are megabytes) while validating sizes themselves first;
  * serve grpc.health.v1 for "" and each service name, NOT_SERVING until the process says it is ready, and
    "liveness", SERVING whenever the process serves at all (for liveness probes);
  * offer reflection only behind a flag;
  * bind an ephemeral port when asked for port 0 and keep a ready file (address, pid, serving) up to date,
    which is how tests and the local mesh learn where a service listens and when it is ready;
  * turn SIGTERM/SIGINT into a graceful shutdown: NOT_SERVING first, then the service's own drain, then stop.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

log = logging.getLogger(__name__)

MiB = 1024 * 1024
#: health service name that is SERVING for as long as the process serves gRPC at all: the liveness probe's.
#: Readiness ("" and each service name) can be NOT_SERVING for good reasons (model loading, scheduler away,
#: draining) that a restart would not fix.
LIVENESS_SERVICE = "liveness"
#: gRPC's own receive limit; services check payload sizes against their lower, documented limits first, so a
#: client sees INVALID_ARGUMENT naming the limit rather than gRPC's RESOURCE_EXHAUSTED
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options for channels between services: big messages, keepalive pings so dead peers are noticed."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnect quickly to a restarted peer instead of backing off for up to two minutes.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
    ]


@dataclass
class ServerConfig:
    listen: str = "127.0.0.1:0"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    reflection: bool = False
    #: seconds in-flight calls get to finish when the server stops
    grace_seconds: float = 10.0
    #: written once bound and on every readiness change: {"address": "host:port", "pid": ..., "serving": bool}
    #: (plus "metrics": the /metrics host:port when metrics are served)
    ready_file: str | None = None


class ServiceHost:
    """A grpc.aio server plus health, reflection and signal handling for one service process."""

    def __init__(self, name: str, config: ServerConfig, interceptors=()):
        self.name = name
        self.config = config
        self.server = grpc.aio.server(options=server_options(config.max_message_bytes),
                                      interceptors=list(interceptors))
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names: list[str] = []
        self.address = ""
        self.port = 0
        self._stopping = asyncio.Event()
        #: more keys for the ready file (e.g. "metrics": the /metrics address)
        self.ready_extra: dict = {}

    def add_service(self, add_to_server: Callable, servicer, service_name: str) -> None:
        add_to_server(servicer, self.server)
        self.service_names.append(service_name)

    async def start(self) -> str:
        """Bind and start; every service NOT_SERVING until `set_serving(True)`. Returns host:port."""
        host = self.config.listen.rsplit(":", 1)[0]
        self.port = self.server.add_insecure_port(self.config.listen)
        if self.port == 0:
            raise OSError(f"{self.name}: cannot listen on {self.config.listen}")
        self.address = f"{host}:{self.port}"
        if self.config.reflection:
            from grpc_reflection.v1alpha import reflection

            reflection.enable_server_reflection(
                [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME], self.server)
        await self.server.start()
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.set_serving(False)
        log.info("%s listening on %s", self.name, self.address)
        return self.address

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ["", *self.service_names]:
            await self.health.set(service, status)
        if self.config.ready_file:
            path = Path(self.config.ready_file)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps({"address": self.address, "pid": os.getpid(), "service": self.name,
                                       "serving": serving, **self.ready_extra}))
            os.replace(tmp, path)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait_for_stop(self) -> None:
        await self._stopping.wait()

    async def shutdown(self, drain: Callable[[], Awaitable[None]] | None = None) -> None:
        """NOT_SERVING (load balancers and the scheduler stop sending), the service's drain, then stop."""
        await self.health.enter_graceful_shutdown()
        if drain is not None:
            try:
                await drain()
            except Exception:  # noqa: BLE001 - a failing drain must not keep the process alive
                log.exception("%s: drain failed", self.name)
        await self.server.stop(self.config.grace_seconds)
        if self.config.ready_file:
            Path(self.config.ready_file).unlink(missing_ok=True)
        log.info("%s stopped", self.name)


def read_ready_file(path: str | Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
