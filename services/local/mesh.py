"""The whole system on one machine: a local S3 server, the scheduler, N CPU workers and the gateway (gRPC and its
HTTP front), on loopback.

`instgenie up` (and `make run`) runs it in the foreground until Ctrl-C; the end-to-end tests use `LocalMesh`
as a fixture. Every process is started in its own session, so Ctrl-C reaches only this supervisor, which then
stops the others in order (gateway, workers with drain, scheduler, S3) and kills whatever does not stop in
time: nothing is left behind. Where every service listens, and the API key, go to `$INSTGENIE_HOME/local.json`
so that the CLI works against the mesh with no flags.

Each process serves Prometheus metrics on its own ephemeral loopback port (`--metrics-listen`, read back from its
ready file); `prometheus_config()` is a scrape configuration for all of them. With `otlp_endpoint`, every
process sends its traces there.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..common.server import read_ready_file
from ..common.testing_s3 import S3Server

BUCKET = "instgenie"


def instgenie_home() -> Path:
    return Path(os.environ.get("INSTGENIE_HOME") or Path.home() / ".instgenie")


@dataclass
class MeshConfig:
    state_dir: Path = Path("var/local")
    #: 0: an ephemeral port (tests); make run uses 50051/50052
    gateway_port: int = 0
    scheduler_port: int = 0
    #: the gateway's HTTP front (OpenAI-compatible API, web page); 0: an ephemeral port, None: no HTTP
    http_port: int | None = 0
    workers: int = 2
    model: str = "digits"
    engine: str = "real"
    #: tenant -> API key; a key is generated for "local" when empty
    tenants: dict[str, str] = field(default_factory=dict)
    torch_threads: int = 1
    host_cache_bytes: int = 512 * 1024 ** 2
    max_batch_size: int = 8
    worker_args: list[str] = field(default_factory=list)
    scheduler_args: list[str] = field(default_factory=list)
    gateway_args: list[str] = field(default_factory=list)
    startup_timeout: float = 180.0
    #: serve /metrics from every process (an ephemeral loopback port each)
    metrics: bool = True
    #: OTLP/gRPC collector for traces ("" = no tracing)
    otlp_endpoint: str = ""
    #: more environment for every process (e.g. OTEL_BSP_SCHEDULE_DELAY)
    env: dict[str, str] = field(default_factory=dict)
    #: write $INSTGENIE_HOME/local.json for the CLI
    publish: bool = False


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    ready_file: Path
    log: Path
    address: str = ""
    #: the HTTP front's host:port (gateway only), read from the ready file
    http: str = ""
    expect_http: bool = False
    #: host:port of its /metrics ("" without metrics)
    metrics: str = ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


class MeshError(RuntimeError):
    pass


class LocalMesh:
    def __init__(self, config: MeshConfig):
        self.config = config
        self.state = Path(config.state_dir).resolve()
        self.s3: S3Server | None = None
        self.scheduler: Process | None = None
        self.workers: list[Process] = []
        self.gateway: Process | None = None
        self.tenants = dict(config.tenants) or {"local": "ig-" + secrets.token_urlsafe(18)}
        self._worker_count = 0

    @property
    def api_key(self) -> str:
        return next(iter(self.tenants.values()))

    @property
    def http_url(self) -> str:
        """Base URL of the gateway's HTTP front ("" without one); the web page is at http_url + "/web/"."""
        return f"http://{self.gateway.http}" if self.gateway is not None and self.gateway.http else ""

    # ---------------------------------------------------------------------------------- processes
    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(INSTGENIE_S3_ENDPOINT=self.s3.endpoint, INSTGENIE_S3_BUCKET=BUCKET,
                   INSTGENIE_S3_ACCESS_KEY=self.s3.access_key, INSTGENIE_S3_SECRET_KEY=self.s3.secret_key,
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        env.update(self.config.env)
        return env

    def _telemetry_args(self) -> list[str]:
        args = ["--metrics-listen", "127.0.0.1:0"] if self.config.metrics else []
        return args + (["--otlp-endpoint", self.config.otlp_endpoint] if self.config.otlp_endpoint else [])

    def _spawn(self, name: str, module: str, args: list[str], env: dict[str, str]) -> Process:
        ready = self.state / "run" / f"{name}.json"
        ready.unlink(missing_ok=True)
        log = self.state / "logs" / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen([sys.executable, "-m", module, *args, *self._telemetry_args(),
                                      "--ready-file", str(ready)],
                                     stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return Process(name, popen, ready, log)

    def _wait_ready(self, procs: list[Process]) -> None:
        end = time.monotonic() + self.config.startup_timeout
        pending = list(procs)
        while pending:
            for p in list(pending):
                if not p.alive():
                    raise MeshError(f"{p.name} exited with code {p.popen.returncode} while starting:\n{p.log_tail()}")
                info = read_ready_file(p.ready_file)
                if info and info.get("serving") and (info.get("http") or not p.expect_http):
                    p.address, p.http, p.metrics = info["address"], info.get("http", ""), info.get("metrics", "")
                    pending.remove(p)
            if time.monotonic() > end:
                raise MeshError(f"{', '.join(p.name for p in pending)} not ready after {self.config.startup_timeout}s:\n"
                                + "\n".join(p.log_tail(10) for p in pending))
            time.sleep(0.05)

    def start(self) -> "LocalMesh":
        for sub in ("run", "logs", "s3"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        try:
            self.s3 = S3Server(self.state / "s3").start()
            self.s3.store(BUCKET).close()  # create the bucket once, before services race to do it
            env = self._env()
            self.scheduler = self._spawn("scheduler", "instgenie.services.scheduler",
                                         ["--listen", f"127.0.0.1:{self.config.scheduler_port}",
                                          *self.config.scheduler_args], env)
            self._wait_ready([self.scheduler])
            self.workers = [self.add_worker(wait=False) for _ in range(self.config.workers)]
            keys = ",".join(f"{t}:{k}" for t, k in self.tenants.items())
            port = self.config.http_port
            http = [] if port is None else ["--http-listen", f"127.0.0.1:{port}"]
            self.gateway = self._spawn("gateway", "instgenie.services.gateway",
                                       ["--listen", f"127.0.0.1:{self.config.gateway_port}",
                                        "--scheduler", self.scheduler.address, *http, *self.config.gateway_args],
                                       {**env, "INSTGENIE_API_KEYS": keys})
            self.gateway.expect_http = bool(http)
            self._wait_ready([*self.workers, self.gateway])
            self.wait_registered(len(self.workers))
        except BaseException:
            self.stop()
            raise
        if self.config.publish:
            self._publish()
        return self

    def add_worker(self, wait: bool = True, extra: list[str] | None = None) -> Process:
        self._worker_count += 1
        name = f"worker-{self._worker_count}"
        args = ["--listen", "127.0.0.1:0", "--scheduler", self.scheduler.address, "--worker-id", name,
                "--model", self.config.model, "--engine", self.config.engine,
                "--models-dir", str(self.state / "models"), "--torch-threads", str(self.config.torch_threads),
                "--host-cache-bytes", str(self.config.host_cache_bytes),
                "--max-batch-size", str(self.config.max_batch_size), *self.config.worker_args, *(extra or [])]
        proc = self._spawn(name, "instgenie.services.worker", args, self._env())
        if wait:
            self._wait_ready([proc])
            self.workers.append(proc)
        return proc

    def wait_registered(self, count: int, timeout: float = 30.0) -> None:
        """Until the scheduler lists `count` live workers."""
        import grpc

        from instgenie.scheduler.v1 import scheduler_service_pb2 as spb
        from instgenie.scheduler.v1 import scheduler_service_pb2_grpc as spb_grpc

        end = time.monotonic() + timeout
        with grpc.insecure_channel(self.scheduler.address) as channel:
            stub = spb_grpc.SchedulerServiceStub(channel)
            while True:
                status = stub.GetClusterStatus(spb.GetClusterStatusRequest(), timeout=5.0)
                live = [w for w in status.workers if not w.load.draining]
                if len(live) >= count:
                    return
                if time.monotonic() > end:
                    raise MeshError(f"only {len(live)} of {count} workers registered after {timeout}s")
                time.sleep(0.1)

    def prometheus_config(self, scrape_interval: str = "5s") -> str:
        """A Prometheus configuration scraping every process of the mesh (job instgenie, a `service` label)."""
        lines = ["global:", f"  scrape_interval: {scrape_interval}", f"  evaluation_interval: {scrape_interval}",
                 "scrape_configs:", "  - job_name: instgenie", "    static_configs:"]
        for p in self.processes():
            if p.metrics:
                service = p.name.split("-")[0]
                lines += [f"      - targets: ['{p.metrics}']", f"        labels: {{service: {service}}}"]
        return "\n".join(lines) + "\n"

    def _publish(self) -> None:
        home = instgenie_home()
        home.mkdir(parents=True, exist_ok=True)
        path = home / "local.json"
        path.write_text(json.dumps({"gateway": self.gateway.address, "scheduler": self.scheduler.address,
                                    "http": self.http_url, "api_key": self.api_key, "pid": os.getpid()}, indent=2))
        path.chmod(0o600)

    def _unpublish(self) -> None:
        path = instgenie_home() / "local.json"
        try:
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (FileNotFoundError, json.JSONDecodeError):
            pass

    # --------------------------------------------------------------------------------------- stop
    @staticmethod
    def _terminate(procs: list[Process], timeout: float) -> None:
        for p in procs:
            if p.alive():
                _signal(p, signal.SIGTERM)
        end = time.monotonic() + timeout
        for p in procs:
            try:
                p.popen.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(p, signal.SIGKILL)
                p.popen.wait(5)

    def stop(self, timeout: float = 20.0) -> None:
        """Gateway, then workers (they drain), then scheduler, then S3; SIGKILL for any that will not stop."""
        if self.gateway is not None:
            self._terminate([self.gateway], timeout)
        self._terminate(self.workers, timeout)
        if self.scheduler is not None:
            self._terminate([self.scheduler], timeout)
        if self.s3 is not None:
            self.s3.stop()
            self.s3 = None
        if self.config.publish:
            self._unpublish()

    def processes(self) -> list[Process]:
        return [p for p in [self.scheduler, *self.workers, self.gateway] if p is not None]

    def __enter__(self) -> "LocalMesh":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal(p: Process, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)  # the whole session: a service's own children go too
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    """`instgenie up`: see services/local/up.py."""
    from .up import run

    return run(argv)
