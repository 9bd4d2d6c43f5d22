"""Serves the HTTP application with uvicorn inside the gateway's own asyncio loop, beside the gRPC server."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    # The gateway process owns SIGTERM/SIGINT (ServiceHost drains gRPC first); uvicorn must not take them.
    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpFront:
    """One uvicorn server on a socket bound here, so port 0 works and the address is known before serving."""

    def __init__(self, app, listen: str, grace_seconds: float = 5.0):
        self.app = app
        self.listen = listen
        self.grace_seconds = grace_seconds
        self.address = ""
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> str:
        host, _, port = self.listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, int(port)))
        except OSError as exc:
            sock.close()
            raise OSError(f"HTTP front: cannot listen on {self.listen}: {exc}") from None
        sock.listen(128)
        sock.setblocking(False)
        bound = sock.getsockname()[1]
        self.address = f"[{host}]:{bound}" if family == socket.AF_INET6 else f"{host}:{bound}"
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=self.grace_seconds, server_header=False)
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError("HTTP front stopped while starting")
            await asyncio.sleep(0.01)
        log.info("HTTP front listening on http://%s (web page /web/, OpenAI API /v1)", self.address)
        return self.address

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await self._task
        log.info("HTTP front stopped")
