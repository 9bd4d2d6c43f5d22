"""The rendered configuration around the services: Secrets (tenants file the gateway really loads, S3
credentials, the test key), bundled vs external MinIO, the helm test hook, dashboards, the cost-model profile,
metrics and the ServiceMonitor, and the worker-discovery RBAC."""
from __future__ import annotations

import json
import shutil

import pytest

from instgenie import smoke
from instgenie.services.gateway.auth import ApiKeys
from instgenie.services.scheduler.profile import load_profiles
from tests.charts.chart_helpers import (CHART, NAMESPACE, RELEASE, container, env_of, find, kinds, render,
                                        render_error)

PREFIX = f"{RELEASE}-instgenie"


def _mounted_file(pod_spec: dict, c: dict, path: str) -> tuple[str, str]:
    """(Secret name, key) behind a file path of the container."""
    for mount in c["volumeMounts"]:
        if path.startswith(mount["mountPath"] + "/"):
            volume = next(v for v in pod_spec["volumes"] if v["name"] == mount["name"])
            rel = path[len(mount["mountPath"]) + 1:]
            item = next(i for i in volume["secret"]["items"] if i["path"] == rel)
            return volume["secret"]["secretName"], item["key"]
    raise AssertionError(f"{path} is not mounted")


def test_the_tenants_secret_is_a_file_the_gateway_loads_with_the_test_tenant(tmp_path):
    key = "acme-key-0123456789"
    manifests = render(None, f"gateway.apiKeys.tenants.acme.keys={{{key}}}",
                       "gateway.apiKeys.tenants.acme.max_in_flight=16", "smokeTest.apiKey=smoke-key-0123456789")
    gateway = find(manifests, "Deployment", "-gateway")
    pod, c = gateway["spec"]["template"]["spec"], container(gateway)
    env = env_of(c)
    secret_name, secret_key = _mounted_file(pod, c, env["INSTGENIE_API_KEYS_FILE"]["value"])
    tenants_file = tmp_path / "api-keys.json"
    tenants_file.write_text(find(manifests, "Secret", secret_name)["stringData"][secret_key])

    smoke_ref = env["SMOKE_TEST_API_KEY"]["valueFrom"]["secretKeyRef"]
    smoke_key = find(manifests, "Secret", smoke_ref["name"])["stringData"][smoke_ref["key"]]
    assert smoke_key == "smoke-key-0123456789"
    keys = ApiKeys.load(str(tenants_file), env["INSTGENIE_API_KEYS"]["value"].replace("$(SMOKE_TEST_API_KEY)",
                                                                                      smoke_key))
    acme = keys.authenticate([("authorization", f"Bearer {key}")])
    assert (acme.name, acme.max_in_flight) == ("acme", 16)
    assert keys.authenticate([("authorization", f"Bearer {smoke_key}")]).name == "helm-test"

    # The test pod reads the same key from the same Secret.
    test_pod = find(manifests, "Pod", "-smoke-test")
    args = smoke.parse_args(container(test_pod)["command"][3:])
    assert _mounted_file(test_pod["spec"], container(test_pod), args.api_key_file) == (smoke_ref["name"],
                                                                                       smoke_ref["key"])


def test_existing_secrets_are_used_and_nothing_is_created():
    manifests = render("external-minio")
    assert not [m for m in manifests if m["kind"] == "Secret"]
    gateway = find(manifests, "Deployment", "-gateway")
    env = env_of(container(gateway))
    assert _mounted_file(gateway["spec"]["template"]["spec"], container(gateway),
                         env["INSTGENIE_API_KEYS_FILE"]["value"]) == ("instgenie-tenants", "tenants.json")
    assert "INSTGENIE_API_KEYS" not in env, "the test key is one of the user's own: no tenant is added"
    assert env["INSTGENIE_S3_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "instgenie-s3",
                                                                          "key": "AWS_ACCESS_KEY_ID"}
    test_pod = find(manifests, "Pod", "-smoke-test")
    args = smoke.parse_args(container(test_pod)["command"][3:])
    assert _mounted_file(test_pod["spec"], container(test_pod), args.api_key_file) == ("instgenie-smoke", "key")


def test_a_gateway_without_any_key_is_refused():
    error = render_error(None, "smokeTest.enabled=false")
    assert "the gateway has no API keys" in error


def test_bundled_minio_shares_its_root_user_with_the_services():
    manifests = render()
    minio = find(manifests, "Deployment", "-minio")
    minio_env = env_of(container(minio))
    worker_env = env_of(container(find(manifests, "Deployment", "-worker")))
    assert worker_env["INSTGENIE_S3_ENDPOINT"]["value"] == f"{PREFIX}-minio:9000"
    assert find(manifests, "Service", "-minio")["spec"]["ports"][0]["port"] == 9000
    assert minio_env["MINIO_ROOT_USER"]["valueFrom"] == worker_env["INSTGENIE_S3_ACCESS_KEY"]["valueFrom"]
    assert minio_env["MINIO_ROOT_PASSWORD"]["valueFrom"] == worker_env["INSTGENIE_S3_SECRET_KEY"]["valueFrom"]
    s3 = find(manifests, "Secret", "-s3")["stringData"]
    assert len(s3["access-key"]) == 20 and len(s3["secret-key"]) == 40
    data = next(v for v in minio["spec"]["template"]["spec"]["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"]["claimName"] == find(manifests, "PersistentVolumeClaim", "-minio")[
        "metadata"]["name"]


@pytest.mark.parametrize("sets, volume", [
    (("minio.persistence.enabled=false",), {"name": "data", "emptyDir": {}}),
    (("minio.persistence.existingClaim=old-data",), {"name": "data", "persistentVolumeClaim": {"claimName": "old-data"}}),
])
def test_minio_storage_options(sets, volume):
    manifests = render(None, *sets)
    assert not [m for m in manifests if m["kind"] == "PersistentVolumeClaim"]
    assert volume in find(manifests, "Deployment", "-minio")["spec"]["template"]["spec"]["volumes"]


def test_an_external_endpoint_replaces_minio():
    manifests = render("external-minio")
    assert not [k for k in kinds(manifests) if "minio" in k[1]]
    env = env_of(container(find(manifests, "Deployment", "-gateway")))
    assert env["INSTGENIE_S3_ENDPOINT"]["value"] == "minio.storage.svc:9000"
    assert env["INSTGENIE_S3_BUCKET"]["value"] == "instgenie-prod"
    assert "objectStore.endpoint is required" in render_error(None, "minio.enabled=false")


def test_the_helm_test_hook_runs_a_real_edit_against_the_gateway_service():
    manifests = render("gpu")
    pod = find(manifests, "Pod", "-smoke-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    command = container(pod)["command"]
    assert command[:3] == ["python", "-m", "instgenie.smoke"]
    args = smoke.parse_args(command[3:])
    service = find(manifests, "Service", "-gateway")
    assert args.address == f"{service['metadata']['name']}.{NAMESPACE}.svc:{service['spec']['ports'][0]['port']}"
    assert args.max_pixel_diff == 48 and args.wait_seconds == 300 and args.model == ""
    assert container(pod)["image"] == container(find(manifests, "Deployment", "-gateway"))["image"]

    off = render(None, "smokeTest.enabled=false", "gateway.apiKeys.tenants.acme.keys={acme-key-0123456789}")
    assert not [m for m in off if m["kind"] == "Pod" or m["metadata"]["name"].endswith("-smoke-key")]
    assert "INSTGENIE_API_KEYS" not in env_of(container(find(off, "Deployment", "-gateway")))


def test_dashboards_are_one_configmap_for_the_grafana_sidecar(tmp_path):
    cm = find(render(), "ConfigMap", "-dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["instgenie.json"]) == json.loads((CHART / "dashboards" / "instgenie.json").read_text())
    assert set(cm["data"]) == {"instgenie.json"}, "only *.json files"
    chart = tmp_path / "instgenie"
    shutil.copytree(CHART, chart)
    extra = json.dumps({"title": "More", "uid": "more", "schemaVersion": 39, "panels": []})
    (chart / "dashboards" / "more.json").write_text(extra)
    cm = find(render(None, chart=chart), "ConfigMap", "-dashboards")
    assert set(cm["data"]) == {"instgenie.json", "more.json"} and json.loads(cm["data"]["more.json"]) == json.loads(extra)
    assert not [m for m in render(None, "dashboards.enabled=false", chart=chart) if m["kind"] == "ConfigMap"]


def test_the_dashboard_queries_only_instgenie_metrics_the_services_export():
    """Every metric name in the dashboard's PromQL is one the services create (the Prometheus test runs them)."""
    import re

    board = json.loads((CHART / "dashboards" / "instgenie.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    names = {re.sub(r"_(bucket|sum|count|total)$", "", n) for e in exprs for n in re.findall(r"instgenie_\w+", e)}
    sources = "".join(p.read_text() for p in (CHART.parents[1] / "services").rglob("*.py"))
    for name in names:
        base = re.sub(r"_(bytes|seconds)$", "", name)
        assert f'"{name}"' in sources or f'"{base}"' in sources, name
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])


def test_the_cost_model_profile_is_mounted_into_the_scheduler_and_loaded(tmp_path):
    assert not [m for m in render() if m["kind"] == "ConfigMap" and m["metadata"]["name"].endswith("-cost-model")]
    manifests = render("full")
    cm = find(manifests, "ConfigMap", "-cost-model")
    scheduler = find(manifests, "Deployment", "-scheduler")
    assert env_of(container(scheduler))["INSTGENIE_PROFILE"]["value"] == "/etc/instgenie/cost-model"
    assert "INSTGENIE_PROFILE" not in env_of(container(find(render(), "Deployment", "-scheduler")))
    # What the scheduler will read there is a profile it loads, with the id the values gave.
    (tmp_path / "profile.json").write_text(cm["data"]["profile.json"])
    assert [p.profile_id for p in load_profiles(str(tmp_path))] == ["digits-16px@cpu#596fccc404a7"]
    assert {"name": "cost-model", "mountPath": "/etc/instgenie/cost-model", "readOnly": True} in container(
        scheduler)["volumeMounts"]
    assert {"name": "cost-model", "configMap": {"name": cm["metadata"]["name"]}} in scheduler["spec"]["template"][
        "spec"]["volumes"]


def test_the_worker_store_read_cap_reaches_the_worker_flag():
    from instgenie.services.worker.__main__ import parse_args

    default = env_of(container(find(render(), "Deployment", "-worker")))["INSTGENIE_STORE_READ_MBPS"]["value"]
    capped = env_of(container(find(render(None, "worker.storeReadMBps=250"), "Deployment", "-worker")))
    assert default == "0"
    # What the worker makes of the rendered value: its --store-read-mbps default comes from the variable.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INSTGENIE_STORE_READ_MBPS", capped["INSTGENIE_STORE_READ_MBPS"]["value"])
        assert parse_args([]).store_read_mbps == 250.0
    assert "storeReadMBps" in render_error(None, "worker.storeReadMBps=-1")


def test_metrics_ports_and_the_service_monitor():
    for component in ("gateway", "scheduler", "worker"):  # on by default: every service serves /metrics
        env = env_of(container(find(render(), "Deployment", f"-{component}")))
        assert env["INSTGENIE_METRICS_LISTEN"]["value"] == "0.0.0.0:9464"
        assert "INSTGENIE_OTLP_ENDPOINT" not in env
    for m in render(None, "metrics.enabled=false"):
        if m["kind"] == "Service":
            assert "metrics" not in {p["name"] for p in m["spec"]["ports"]}
        if m["kind"] == "Deployment":
            assert "metrics" not in {p["name"] for p in container(m)["ports"]}
        assert m["kind"] != "ServiceMonitor"
        if m["kind"] == "Deployment":
            assert "INSTGENIE_METRICS_LISTEN" not in env_of(container(m))
    manifests = render("full")
    monitor = find(manifests, "ServiceMonitor", "")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "interval": "30s", "scrapeTimeout": "10s"}]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selector = monitor["spec"]["selector"]
    scraped = []
    for service in (m for m in manifests if m["kind"] == "Service"):
        labels = service["metadata"]["labels"]
        if all(labels.get(k) == v for k, v in selector["matchLabels"].items()) and all(
                labels.get(e["key"]) in e["values"] for e in selector["matchExpressions"]):
            assert {"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP"} in service[
                "spec"]["ports"]
            scraped.append(labels["app.kubernetes.io/component"])
    assert sorted(scraped) == ["gateway", "scheduler", "worker"]
    for component in ("gateway", "scheduler", "worker"):
        ports = container(find(manifests, "Deployment", f"-{component}"))["ports"]
        assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in ports
    assert "needs metrics.enabled" in render_error(None, "metrics.enabled=false", "metrics.serviceMonitor.enabled=true")
    for component in ("gateway", "scheduler", "worker"):  # tracing: the full values name a collector
        env = env_of(container(find(manifests, "Deployment", f"-{component}")))
        assert env["INSTGENIE_OTLP_ENDPOINT"]["value"] == "otel-collector.observability.svc:4317"
        assert env["OTEL_TRACES_SAMPLER"]["value"] == "parentbased_traceidratio"
        assert env["OTEL_TRACES_SAMPLER_ARG"]["value"] == "0.25"


def test_worker_discovery_grants_only_reading_pods_and_mounts_the_token_only_then():
    off = render(None, "scheduler.workerDiscovery.enabled=false")
    spec = find(off, "Deployment", "-scheduler")["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert "INSTGENIE_DISCOVER_WORKERS" not in env_of(spec["containers"][0])
    assert not [m for m in off if m["kind"] in ("Role", "RoleBinding")]
    manifests = render()  # on by default
    env = env_of(container(find(manifests, "Deployment", "-scheduler")))
    assert env["INSTGENIE_DISCOVER_WORKERS"]["value"] == "true"
    assert env["INSTGENIE_DISCOVER_SELECTOR"]["value"] == \
        f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=worker"
    role = find(manifests, "Role", "-worker-discovery")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    binding = find(manifests, "RoleBinding", "-worker-discovery")
    scheduler = find(manifests, "Deployment", "-scheduler")["spec"]["template"]["spec"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": scheduler["serviceAccountName"],
                                    "namespace": NAMESPACE}]
    assert scheduler["automountServiceAccountToken"] is True
    # The selector discovery will use matches the worker pods and nothing else.
    selector = {"app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/component": "worker"}
    pods = [(m["metadata"]["name"], m["spec"]["template"]["metadata"]["labels"]) for m in manifests
            if m["kind"] == "Deployment"]
    assert [name for name, labels in pods if selector.items() <= labels.items()] == [f"{PREFIX}-worker"]
