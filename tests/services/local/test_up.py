"""`instgenie up` (what `make run` runs): starts everything, shows an edit, serves until Ctrl-C, leaves nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def leftovers(marker: str) -> list[str]:
    """Processes whose command line mentions `marker` (every process the mesh starts names its state dir)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd and int(pid) != os.getpid():
            found.append(f"{pid}: {cmd[:200]}")
    return found


def up(tmp_path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "INSTGENIE_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "instgenie.services.local", "--gateway-port", "0",
                             "--scheduler-port", "0", "--http-port", "0", "--state-dir", str(tmp_path / "state"),
                             *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def test_up_shows_an_edit_through_the_cli_and_stops_clean(tmp_path):
    proc = up(tmp_path, "--exit-after-demo")
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    assert "registered demo template tpl-" in out and "$ instgenie edit --template tpl-" in out
    assert "no process left behind" in out
    # where each process serves its metrics, and a Prometheus configuration scraping them all
    assert "metrics (Prometheus): scheduler http://127.0.0.1:" in out and "/metrics" in out
    assert "worker-1 http://127.0.0.1:" in out and "gateway http://127.0.0.1:" in out
    assert "job_name: instgenie" in (tmp_path / "state" / "prometheus.yml").read_text()
    demo = tmp_path / "state" / "demo"
    assert (demo / "edited.png").stat().st_size > 0 and (demo / "demo.png").exists()
    assert leftovers(str(tmp_path / "state")) == []
    assert not (tmp_path / "home" / "local.json").exists()


def test_up_serves_until_sigint_and_the_cli_needs_no_flags(tmp_path):
    proc = up(tmp_path, "--no-demo", "--workers", "1")
    lines = []
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:
            lines.append(line)
            if "serving until Ctrl-C" in line or time.monotonic() > deadline:
                break
        assert any("serving until Ctrl-C" in line for line in lines), "".join(lines)
        local = json.loads((tmp_path / "home" / "local.json").read_text())
        assert local["gateway"].startswith("127.0.0.1:") and local["api_key"]
        # The HTTP front: its URL is printed and published; the web page and the OpenAI API answer there.
        assert local["http"].startswith("http://127.0.0.1:") and local["http"] != "http://127.0.0.1:8080"
        assert any(f"web page: {local['http']}/web/" in line for line in lines), "".join(lines)
        with urllib.request.urlopen(local["http"] + "/web/", timeout=30) as page:
            assert b"mask-canvas" in page.read()
        request = urllib.request.Request(local["http"] + "/v1/models",
                                         headers={"Authorization": f"Bearer {local['api_key']}"})
        with urllib.request.urlopen(request, timeout=30) as models:
            assert json.loads(models.read())["data"][0]["id"] == "digits-16px"
        env = {**os.environ, "INSTGENIE_HOME": str(tmp_path / "home")}
        env.pop("INSTGENIE_ADDRESS", None)
        env.pop("INSTGENIE_API_KEY", None)
        cli = str(Path(sys.executable).with_name("instgenie"))
        for cmd in (["models"], ["templates", "list"], ["status"]):
            run = subprocess.run([cli, *cmd], env=env, capture_output=True, text=True, timeout=60)
            assert run.returncode == 0, (cmd, run.stdout, run.stderr)
        assert "digits-16px" in subprocess.run([cli, "models"], env=env, capture_output=True, text=True,
                                               timeout=60).stdout
        os.kill(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, "".join(lines) + rest
    assert "no process left behind" in rest
    assert leftovers(str(tmp_path / "state")) == []
    assert not (tmp_path / "home" / "local.json").exists()
