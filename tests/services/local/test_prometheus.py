"""A real Prometheus (Debian's `prometheus` binary) scrapes every process of the local mesh under a little load,
and every PromQL expression of the Grafana dashboard (charts/instgenie/dashboards/instgenie.json) returns data."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from instgenie.gateway.v1 import edit_service_pb2 as pb
from tests.services.mesh_helpers import SIZE, auth, channel, create_template, digit, png, stub, wait_for

pytestmark = pytest.mark.slow

DASHBOARD = Path(__file__).resolve().parents[3] / "charts" / "instgenie" / "dashboards" / "instgenie.json"
#: what the Grafana variables of the dashboard stand for in the test
VARIABLES = {"$__rate_interval": "1m", "$model": ".*"}


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        message = ("Debian's prometheus is not installed (.ci/run installs it: apt-get install "
                   "--no-install-recommends prometheus)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every query of the dashboard, variables substituted."""
    board = json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"unknown variable in {expr!r}"
            out.append((panel["title"], expr))
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            # label_values(metric, label): the metric must exist
            metric = re.match(r"label_values\((\w+),", var["query"]["query"]).group(1)
            out.append((f"variable {var['name']}", metric))
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Prometheus:
    def __init__(self, binary: str, workdir: Path, config: str):
        self.workdir = workdir
        (workdir / "prometheus.yml").write_text(config)
        self.log = open(workdir / "prometheus.log", "wb")
        for _ in range(5):  # the port was free a moment ago; another process may take it first
            self.url = f"http://127.0.0.1:{free_port()}"
            self.proc = subprocess.Popen(
                [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address={self.url[len('http://'):]}", "--log.level=warn"],
                stdout=self.log, stderr=subprocess.STDOUT)
            if wait_for(self.ready, timeout=30, interval=0.1):
                return
            self.stop()
        raise AssertionError(f"prometheus did not start: {(workdir / 'prometheus.log').read_text()[-2000:]}")

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            return True  # exited: the caller sees it is not serving
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> list:
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def prometheus(observed_mesh, tmp_path):
    binary = prometheus_binary()
    prom = Prometheus(binary, tmp_path, observed_mesh.prometheus_config(scrape_interval="1s"))
    yield prom
    prom.stop()
    prom.log.close()


def mask(ratio: float) -> np.ndarray:
    """A mask over the leftmost columns covering about `ratio` of the image."""
    m = np.zeros((SIZE, SIZE), dtype=np.uint8)
    m[:, : max(1, round(SIZE * ratio))] = 255
    return m


def load(mesh, edits: int = 16) -> tuple[int, int]:
    """Concurrent edits over two templates (half of them on one) with mask ratios from 1/16 to all, and two that
    fail (a template id that cannot exist). Returns (answered, failed)."""
    with channel(mesh) as ch:
        s = stub(ch)
        templates = [create_template(s, image=digit(3)), create_template(s, image=digit(5), prompt="5")]
        failures = []

        def one(i: int) -> None:
            template = templates[0] if i % 4 else templates[1]
            try:
                s.Edit(pb.EditRequest(template_id=template, mask=png(mask((1 + i % 8) / 8)), prompt="8", seed=i),
                       metadata=auth(), timeout=120)
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                failures.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(edits)]
        for t in threads:
            t.start()
            time.sleep(0.02)
        for t in threads:
            t.join()
        assert not failures, failures
        bad = 0
        for _ in range(2):
            try:
                s.Edit(pb.EditRequest(template_id="tpl-doesnotexist0000", mask=png(mask(0.5)), prompt="8"),
                       metadata=auth(), timeout=30)
            except Exception:  # noqa: BLE001 - refused (a malformed template id), counted by the gateway
                bad += 1
        assert bad == 2
    return edits, bad


def test_every_dashboard_query_returns_data_from_a_real_prometheus_scraping_the_mesh(observed_mesh, prometheus):
    assert wait_for(lambda: prometheus.value("count(up == 1)") == len(observed_mesh.processes()), timeout=60), \
        prometheus.query("up")
    answered, failed = load(observed_mesh)
    # Until scrapes after the load have landed.
    assert wait_for(lambda: prometheus.value("sum(instgenie_requests_total)") >= answered + failed, timeout=60), \
        prometheus.query("instgenie_requests_total")
    assert wait_for(lambda: prometheus.value('sum(instgenie_scheduler_requests_total{status="OK"})') >= answered,
                    timeout=60)

    queries = dashboard_queries()
    assert len(queries) >= 20
    empty: list = []

    def all_answer() -> bool:
        empty[:] = [(title, expr) for title, expr in queries if not prometheus.query(expr)]
        return not empty

    # Each process is scraped on its own schedule: give the last scrapes a moment before judging.
    assert wait_for(all_answer, timeout=30, interval=1.0), "dashboard queries without data:\n" + "\n".join(
        f"  {title}: {expr}" for title, expr in empty)
    # The numbers are those of the load: requests by status, and every edit ran in some batch.
    by_status = {r["metric"]["status"]: float(r["value"][1])
                 for r in prometheus.query("sum by (status) (instgenie_requests_total)")}
    assert by_status.get("OK", 0) >= answered and sum(by_status.values()) - by_status["OK"] >= failed, by_status
    assert prometheus.value("sum(instgenie_worker_batch_size_count)") > 0
    assert prometheus.value("sum(instgenie_scheduler_workers)") == len(observed_mesh.workers)
