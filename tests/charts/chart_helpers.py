"""Running the pinned helm (.tools/bin/helm, `make tools`) on charts/instgenie, offline, and reading what it renders.

Tools are required in CI (CI=true: a missing one fails the test) and optional elsewhere (the test is skipped
with the command that installs it). helm gets private config/cache dirs and an empty kubeconfig, so it never
reads the developer's cluster settings and never talks to a cluster.
"""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "instgenie"
HELM = REPO / ".tools" / "bin" / "helm"
VALUES = {
    "default": None,
    "gpu": CHART / "ci" / "gpu-values.yaml",
    "external-minio": CHART / "ci" / "external-minio-values.yaml",
    "full": CHART / "ci" / "full-values.yaml",
}
RELEASE, NAMESPACE = "ig", "serving"
#: the newest bundled schemas of kubernetes-validate, the chart's minimum (gRPC probes GA) and two in between
KUBE_VERSIONS = ("1.27.0", "1.29.0", "1.33.0")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(available: bool, what: str, install: str) -> None:
    """Fail in CI, skip elsewhere, when a tool the test needs is missing."""
    if available:
        return
    message = f"{what} is not installed; install it with `{install}`"
    if in_ci():
        pytest.fail(f"{message} (CI=true: tools are required)")
    pytest.skip(message)


def helm_path() -> Path:
    require(HELM.is_file() and os.access(HELM, os.X_OK), f"helm ({HELM.relative_to(REPO)})", "make tools")
    return HELM


@functools.lru_cache(maxsize=1)
def _helm_env() -> dict[str, str]:
    home = Path(tempfile.mkdtemp(prefix="helm-test-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    kubeconfig = home / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HELM_", "KUBE"))}
    env.update(HELM_CONFIG_HOME=str(home / "config"), HELM_CACHE_HOME=str(home / "cache"),
               HELM_DATA_HOME=str(home / "data"), KUBECONFIG=str(kubeconfig))
    return env


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(helm_path()), *args], capture_output=True, text=True, env=_helm_env(), timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return proc


def value_args(values: str | Path | None = None, sets: tuple[str, ...] = ()) -> list[str]:
    path = VALUES.get(values, values) if isinstance(values, str) else values
    args = ["-f", str(path)] if path else []
    for item in sets:
        args += ["--set", item]
    return args


@functools.lru_cache(maxsize=None)
def _render(values, sets: tuple[str, ...], kube_version: str, chart: Path) -> str:
    return helm("template", RELEASE, str(chart), "--namespace", NAMESPACE, "--kube-version", kube_version,
                *value_args(values, sets)).stdout


def render(values: str | Path | None = None, *sets: str, kube_version: str = "1.33.0",
           chart: Path = CHART) -> list[dict]:
    """The manifests `helm template` renders (hooks included), as dicts."""
    text = _render(values, tuple(sets), kube_version, chart)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render_error(values: str | Path | None = None, *sets: str) -> str:
    """stderr of a `helm template` that must fail."""
    proc = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *value_args(values, sets), check=False)
    assert proc.returncode != 0, f"helm template succeeded with {values} {sets}"
    return proc.stderr


def find(manifests: list[dict], kind: str, name_suffix: str = "") -> dict:
    """The one manifest of `kind` whose name ends with `name_suffix`."""
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} named *{name_suffix}, found {[m['metadata']['name'] for m in found]}"
    return found[0]


def kinds(manifests: list[dict]) -> list[tuple[str, str]]:
    return sorted((m["kind"], m["metadata"]["name"]) for m in manifests)


def container(manifest: dict, name: str | None = None) -> dict:
    spec = manifest["spec"]["template"]["spec"] if manifest["kind"] != "Pod" else manifest["spec"]
    containers = spec["containers"]
    return containers[0] if name is None else next(c for c in containers if c["name"] == name)


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}
