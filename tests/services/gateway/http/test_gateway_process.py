"""The gateway binary with --http-listen: its ready file names the HTTP address, upload limits answer 413 and
leave it serving, readiness follows the scheduler, SIGTERM stops both ports."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from instgenie.services.common.server import read_ready_file
from tests.services.mesh_helpers import TENANTS, digit, port_free, wait_for

from .helpers import call, call_json, openai_mask, png, right_half

pytestmark = pytest.mark.slow

LIMIT = 64 * 1024


def start_gateway(mesh, tmp: Path, name: str, scheduler: str, *args: str) -> tuple[subprocess.Popen, dict]:
    ready = tmp / f"{name}.json"
    env = {**mesh._env(), "INSTGENIE_API_KEYS": ",".join(f"{t}:{k}" for t, k in TENANTS.items())}
    with open(tmp / f"{name}.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "instgenie.services.gateway", "--listen", "127.0.0.1:0",
                                 "--http-listen", "127.0.0.1:0", "--scheduler", scheduler, "--ready-file", str(ready),
                                 *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    ok = wait_for(lambda: proc.poll() is not None or "http" in (read_ready_file(ready) or {}), 60)
    assert ok and proc.poll() is None, (tmp / f"{name}.log").read_text()
    return proc, read_ready_file(ready)


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_upload_limits_answer_413_and_the_gateway_goes_on(mesh, tmp_path):
    proc, info = start_gateway(mesh, tmp_path, "small", mesh.scheduler.address, "--max-image-bytes", str(LIMIT))
    try:
        base = f"http://{info['http']}"
        assert info["http"].startswith("127.0.0.1:") and info["address"] != info["http"]
        assert wait_for(lambda: call(base, "GET", "/readyz", tenant=None)[0] == 200, 30)
        fields = {"image": ("big.png", b"\x89PNG" + bytes(LIMIT)), "mask": ("m.png", openai_mask(right_half())),
                  "prompt": "8"}
        status, _, body = call_json(base, "POST", "/v1/images/edits", fields=fields)
        assert status == 413 and body["error"]["code"] == "image_too_large" and body["error"]["param"] == "image"
        # A body past the whole-request limit (two images and the fields) is read and dropped, then refused.
        fields["image"] = ("huge.png", bytes(3 * LIMIT + 1024 * 1024))
        status, _, body = call_json(base, "POST", "/v1/images/edits", fields=fields)
        assert status == 413 and body["error"]["code"] == "body_too_large"
        fields["image"] = ("digit.png", png(digit(3)))
        status, headers, body = call_json(base, "POST", "/v1/images/edits", fields=fields)
        assert status == 200 and len(body["data"]) == 1, body
    finally:
        code = stop(proc)
    assert code == 0
    assert port_free(info["http"]) and port_free(info["address"])
    assert read_ready_file(tmp_path / "small.json") is None


def test_readiness_follows_the_scheduler(mesh, tmp_path):
    proc, info = start_gateway(mesh, tmp_path, "lonely", "127.0.0.1:9")  # discard port: nothing answers
    try:
        base = f"http://{info['http']}"
        assert info["serving"] is False
        status, _, body = call_json(base, "GET", "/readyz", tenant=None)
        assert status == 503 and body["scheduler"] == "unreachable"
        assert call(base, "GET", "/healthz", tenant=None)[0] == 200
        status, _, body = call_json(base, "GET", "/v1/models")
        assert status == 503 and body["error"]["type"] == "server_error"
    finally:
        assert stop(proc) == 0
