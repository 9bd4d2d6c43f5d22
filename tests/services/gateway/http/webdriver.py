"""A small W3C WebDriver client (plain urllib + json) driving Debian's chromedriver and headless Chromium.

chromedriver listens on an ephemeral loopback port (--port=0, read back from its log); Chromium gets a fresh
profile directory and the flags that keep it off the network. Both are stopped by `close()`.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1500,950", "--force-device-scale-factor=1"]


def browser_tools() -> tuple[str | None, str | None]:
    """(chromium binary, chromedriver) or None for what is missing. The Debian wrapper script execs the
    binary in /usr/lib/chromium; chromedriver is given the binary itself."""
    binary = next((p for p in ("/usr/lib/chromium/chromium",) if os.access(p, os.X_OK)), None)
    return binary or shutil.which("chromium"), shutil.which("chromedriver")


class WebDriverError(RuntimeError):
    pass


class Browser:
    def __init__(self, binary: str, driver: str, workdir: Path):
        self.log = workdir / "chromedriver.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([driver, "--port=0"], stdout=out, stderr=subprocess.STDOUT)
        self.base = ""
        self.session = ""
        try:
            end = time.monotonic() + 30
            while not self.base:
                m = re.search(r"started successfully on port (\d+)", self.log.read_text(errors="replace"))
                if m:
                    self.base = f"http://127.0.0.1:{m.group(1)}"
                elif self.proc.poll() is not None or time.monotonic() > end:
                    raise WebDriverError(f"chromedriver did not start:\n{self.log.read_text(errors='replace')}")
                else:
                    time.sleep(0.05)
            caps = {"browserName": "chrome", "goog:chromeOptions": {
                "binary": binary, "args": [*CHROMIUM_FLAGS, f"--user-data-dir={workdir / 'profile'}"]}}
            self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]
        except BaseException:
            self.close()
            raise

    def _call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                return json.loads(resp.read())["value"]
        except urllib.error.HTTPError as err:
            raise WebDriverError(f"{method} {path}: {err.code} {err.read()[:500]!r}") from None

    def _s(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def open(self, url: str) -> None:
        self._s("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        return self._s("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def click(self, css: str) -> None:
        self._s("POST", f"/element/{self.find(css)}/click", {})

    def type(self, css: str, text: str) -> None:
        element = self.find(css)
        self._s("POST", f"/element/{element}/clear", {})
        self._s("POST", f"/element/{element}/value", {"text": text})

    def upload(self, css: str, path: Path) -> None:
        self._s("POST", f"/element/{self.find(css)}/value", {"text": str(path)})

    def js(self, script: str, *args):
        return self._s("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait(self, script: str, timeout: float = 60.0, what: str = ""):
        """Until `script` (a JS expression) is truthy; its value. Fails with the page's status line."""
        end = time.monotonic() + timeout
        while True:
            value = self.js(f"return ({script});")
            if value:
                return value
            if time.monotonic() > end:
                status = self.js("return document.getElementById('status').textContent;")
                raise WebDriverError(f"waited {timeout}s for {what or script}; page status: {status!r}")
            time.sleep(0.05)

    def drag(self, css: str, points: list[tuple[float, float]]) -> None:
        """One pointer stroke through `points` (offsets from the element's centre, CSS pixels)."""
        origin = {ELEMENT: self.find(css)}
        steps = [{"type": "pointerMove", "origin": origin, "x": round(points[0][0]), "y": round(points[0][1]),
                  "duration": 0}, {"type": "pointerDown", "button": 0}]
        steps += [{"type": "pointerMove", "origin": origin, "x": round(x), "y": round(y), "duration": 20}
                  for x, y in points[1:]]
        steps.append({"type": "pointerUp", "button": 0})
        self._s("POST", "/actions", {"actions": [{"type": "pointer", "id": "mouse",
                                                  "parameters": {"pointerType": "mouse"}, "actions": steps}]})

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self._s("GET", "/screenshot")))

    def close(self) -> None:
        try:
            if self.session:
                self._s("DELETE", "")
        except (WebDriverError, OSError):
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
