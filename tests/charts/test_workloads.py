"""The rendered gateway, scheduler and worker Deployments: gRPC health probes, GPU scheduling, the host-cache
budget, scaling, and that every INSTGENIE_* variable the chart sets is a real flag that the service parses."""
from __future__ import annotations

import contextlib
import functools
import io
import os
import re
from unittest import mock

import pytest

from tests.charts.chart_helpers import RELEASE, VALUES, container, env_of, find, render, render_error

COMPONENTS = ("gateway", "scheduler", "worker")
GiB = 1024 ** 3


@pytest.mark.parametrize("values", ["default", "gpu"])
@pytest.mark.parametrize("component", COMPONENTS)
def test_probes_are_grpc_health_checks_on_the_grpc_port(values, component):
    c = container(find(render(values), "Deployment", f"-{component}"))
    port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    # Liveness asks the always-SERVING "liveness" service: readiness reasons are no reason to restart.
    for kind, service in (("startupProbe", ""), ("readinessProbe", ""), ("livenessProbe", "liveness")):
        probe = c[kind]
        assert probe["grpc"] == {"port": port, "service": service}, (component, kind)
        assert not {"httpGet", "tcpSocket", "exec"} & probe.keys()


def test_gpu_values_request_the_accelerator_and_place_the_workers():
    worker = find(render("gpu"), "Deployment", "-worker")
    pod, c = worker["spec"]["template"]["spec"], container(worker)
    assert c["resources"]["limits"] == {"nvidia.com/gpu": 1, "memory": "160Gi"}
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert "podAntiAffinity" in pod["affinity"]
    assert env_of(c)["INSTGENIE_DEVICE"]["value"] == "cuda"
    assert env_of(c)["INSTGENIE_MODEL"]["value"] == "/var/lib/instgenie/models/FLUX.1-dev"
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"] == {"claimName": "flux-models", "readOnly": True}
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert {"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"]


def test_the_gpu_resource_name_is_configurable_and_absent_on_cpu_workers():
    mig = container(find(render("gpu", "worker.gpu.resourceName=nvidia.com/mig-3g.40gb", "worker.gpu.count=2"),
                         "Deployment", "-worker"))
    assert mig["resources"]["limits"] == {"nvidia.com/mig-3g.40gb": 2, "memory": "160Gi"}
    cpu = find(render(), "Deployment", "-worker")
    assert "nvidia.com" not in str(cpu) and "runtimeClassName" not in cpu["spec"]["template"]["spec"]
    assert env_of(container(cpu))["INSTGENIE_DEVICE"]["value"] == "cpu"


@pytest.mark.parametrize("sets, expected", [
    ((), 8 * GiB // 2),                                                         # default: 50 % of 8Gi
    (("worker.resources.limits.memory=1.5Gi", "worker.hostCache.memoryLimitPercent=40"), int(1.5 * GiB) * 40 // 100),
    (("worker.resources.limits.memory=64G",), 32 * 10 ** 9),
    (("worker.resources.limits.memory=3000Mi", "worker.hostCache.bytes=1000000"), 1000000),
])
def test_the_host_cache_budget_follows_the_memory_limit(sets, expected):
    c = container(find(render(None, *sets), "Deployment", "-worker"))
    assert env_of(c)["INSTGENIE_HOST_CACHE_BYTES"]["value"] == str(expected)


def test_gpu_values_give_the_cache_tier_60_percent_of_160Gi():
    c = container(find(render("gpu"), "Deployment", "-worker"))
    assert env_of(c)["INSTGENIE_HOST_CACHE_BYTES"]["value"] == str(160 * GiB * 60 // 100)


@pytest.mark.parametrize("sets, message", [
    (("worker.resources.limits=null",), "worker.resources.limits.memory is required"),
    (("worker.hostCache.bytes=8589934592",), "must be below worker.resources.limits.memory"),
    (("worker.resources.limits.memory=8gb",), "cannot read the memory quantity"),
])
def test_the_host_cache_budget_needs_a_sane_memory_limit(sets, message):
    assert message in render_error(None, *sets)


def test_workers_register_under_their_pod_name_and_advertise_their_pod_ip():
    worker = find(render(), "Deployment", "-worker")
    env = env_of(container(worker))
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["INSTGENIE_WORKER_ID"]["value"] == "$(POD_NAME)"
    assert env["INSTGENIE_ADVERTISE"]["value"] == "$(POD_IP):50053"
    assert env["INSTGENIE_SCHEDULER"]["value"] == f"{RELEASE}-instgenie-scheduler:50052"
    # The drain (120 s) and the in-flight grace (10 s) fit in the pod's termination grace.
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 145


def test_the_scheduler_is_one_replica_replaced_not_rolled():
    for values in VALUES:
        manifests = render(values)
        scheduler = find(manifests, "Deployment", "-scheduler")
        assert scheduler["spec"]["replicas"] == 1 and scheduler["spec"]["strategy"] == {"type": "Recreate"}
        assert not [m for m in manifests if m["kind"] == "HorizontalPodAutoscaler"
                    and m["spec"]["scaleTargetRef"]["name"].endswith("-scheduler")]


def test_gateways_scale_with_the_hpa_or_by_replicas():
    manifests = render()
    hpa = find(manifests, "HorizontalPodAutoscaler", "-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": f"{RELEASE}-instgenie-gateway"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 70
    assert "replicas" not in find(manifests, "Deployment", "-gateway")["spec"], "the HPA owns the count"
    full = render("full")
    assert not [m for m in full if m["kind"] == "HorizontalPodAutoscaler"]
    assert find(full, "Deployment", "-gateway")["spec"]["replicas"] == 3


def test_disruption_budgets():
    budgets = {m["metadata"]["name"]: m["spec"] for m in render() if m["kind"] == "PodDisruptionBudget"}
    assert budgets == {
        f"{RELEASE}-instgenie-{c}": {"maxUnavailable": 1, "selector": {"matchLabels": {
            "app.kubernetes.io/name": "instgenie", "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": c}}} for c in ("gateway", "worker")}
    full = {m["metadata"]["name"] for m in render("full") if m["kind"] == "PodDisruptionBudget"}
    assert f"{RELEASE}-instgenie-scheduler" in full


@pytest.mark.parametrize("values", list(VALUES))
def test_pods_run_unprivileged_on_a_read_only_root(values):
    for m in render(values):
        if m["kind"] not in ("Deployment", "Pod"):
            continue
        pod = m["spec"]["template"]["spec"] if m["kind"] == "Deployment" else m["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, m["metadata"]["name"]
        for c in pod["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert "/tmp" in {v["mountPath"] for v in c["volumeMounts"]}, "a writable /tmp"


# -- every INSTGENIE_* variable is a flag of its service, and the service parses what the chart sets --------

def _service_module(component: str):
    import importlib

    return importlib.import_module(f"instgenie.services.{component}.__main__")


@functools.lru_cache(maxsize=None)
def _flag_variables(module) -> set[str]:
    """The INSTGENIE_* variables the service's flags read, as its --help names them."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.parse_args(["--help"])
    return set(re.findall(r"\[env\s+(INSTGENIE_[A-Z0-9_]+)\]", out.getvalue()))


#: variables a service reads itself, beside its flags (docs/mesh.md)
NOT_FLAGS = {"gateway": {"INSTGENIE_API_KEYS"}}
#: what the cluster puts in valueFrom variables: downward API fields and Secret values
DOWNWARD = {"metadata.name": "ig-instgenie-worker-7d9f-abcde", "status.podIP": "10.1.2.3",
            "metadata.namespace": "serving"}


def _container_environment(c: dict) -> dict[str, str]:
    """The variables as the kubelet sets them: valueFrom resolved, $(VAR) references expanded in order."""
    env: dict[str, str] = {}
    for e in c.get("env", []):
        if "valueFrom" in e:
            ref = e["valueFrom"]
            env[e["name"]] = DOWNWARD[ref["fieldRef"]["fieldPath"]] if "fieldRef" in ref else "secret-value-0123"
        else:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), str(e["value"]))
    return env


@pytest.mark.parametrize("values", list(VALUES))
@pytest.mark.parametrize("component", COMPONENTS)
def test_every_instgenie_variable_is_a_flag_the_service_parses(values, component):
    c = container(find(render(values), "Deployment", f"-{component}"))
    env = _container_environment(c)
    module = _service_module(component)
    ours = {name for name in env if name.startswith("INSTGENIE_")}
    unknown = ours - _flag_variables(module) - NOT_FLAGS.get(component, set())
    assert unknown == set(), f"{component}: variables no flag reads"
    with mock.patch.dict(os.environ, env):
        args = module.parse_args(c.get("args", []))  # a value of the wrong type exits here
    assert args.listen == f"0.0.0.0:{c['ports'][0]['containerPort']}"
    if component == "worker":
        assert args.advertise == "10.1.2.3:50053" and args.worker_id == DOWNWARD["metadata.name"]
        assert args.host_cache_bytes == int(env["INSTGENIE_HOST_CACHE_BYTES"]) > 0
        assert args.device == ("cuda" if values == "gpu" else "cpu")
    if component == "scheduler":
        assert (args.flops_per_second, args.max_in_flight, args.lease) == (2e11, 256, 3.0)
    if component != "scheduler":
        assert args.s3_endpoint == env["INSTGENIE_S3_ENDPOINT"] and args.s3_access_key == "secret-value-0123"
        assert args.s3_secure is (values == "external-minio")


def test_the_gateway_serves_http_by_default_and_can_drop_it():
    manifests = render()
    c = container(find(manifests, "Deployment", "-gateway"))
    assert env_of(c)["INSTGENIE_HTTP_LISTEN"]["value"] == "0.0.0.0:8080"
    assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in c["ports"]
    service = find(manifests, "Service", "-gateway")
    assert any(p["name"] == "http" and p["port"] == 8080 for p in service["spec"]["ports"])
    off = render(None, "gateway.http.enabled=false")
    assert "INSTGENIE_HTTP_LISTEN" not in env_of(container(find(off, "Deployment", "-gateway")))
    assert all(p["name"] != "http" for p in find(off, "Service", "-gateway")["spec"]["ports"])
