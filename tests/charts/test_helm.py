"""The chart through the real tools: `helm lint --strict`, `helm template` validated by kubernetes-validate
--strict against several Kubernetes versions, and `helm install --dry-run=client` (no cluster exists here)."""
from __future__ import annotations

import copy

import pytest

from tests.charts.chart_helpers import (CHART, KUBE_VERSIONS, NAMESPACE, RELEASE, VALUES, find, helm, kinds, render,
                                        require, value_args)

#: kinds from CRDs: kubernetes-validate has no schema for them, so test_manifests.py checks them itself
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


@pytest.fixture(scope="module")
def kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        require(False, "kubernetes-validate", "make install (pip install -e '.[test]')")
    return kubernetes_validate


@pytest.mark.parametrize("values", list(VALUES))
def test_lint_strict(values):
    proc = helm("lint", "--strict", str(CHART), *value_args(values))
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", list(VALUES))
def test_every_manifest_is_valid_kubernetes(values, kube_version, kubernetes_validate):
    manifests = render(values, kube_version=kube_version)
    assert len(manifests) >= 10
    unvalidated = set()
    for manifest in manifests:
        try:
            kubernetes_validate.validate(manifest, kube_version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unvalidated.add((manifest["apiVersion"], manifest["kind"]))
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{manifest['kind']} {manifest['metadata']['name']} is invalid for Kubernetes "
                        f"{kube_version}: {err.message} at {'/'.join(map(str, err.path))}")
    assert unvalidated <= CRD_KINDS


def test_the_validator_rejects_what_the_api_server_would(kubernetes_validate):
    """The check above can fail: a typo'd field, a wrong type and an invalid probe are caught at --strict."""
    deployment = find(render(), "Deployment", "-worker")
    kubernetes_validate.validate(deployment, "1.33.0", strict=True)
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 1}}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "three"
    no_port = copy.deepcopy(deployment)
    del no_port["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"]
    for bad in (typo, wrong_type, no_port):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, "1.33.0", strict=True)


@pytest.mark.parametrize("values", ["default", "gpu"])
def test_install_dry_run_client(values):
    proc = helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client", *value_args(values))
    assert "STATUS: pending-install" in proc.stdout
    assert f"kubectl -n {NAMESPACE} port-forward svc/{RELEASE}-instgenie-gateway 50051:50051" in proc.stdout
    assert f"helm test {RELEASE} -n {NAMESPACE} --logs" in proc.stdout


def test_default_install_has_every_component():
    assert kinds(render()) == sorted([
        ("ConfigMap", "ig-instgenie-dashboards"), ("Role", "ig-instgenie-worker-discovery"),
        ("RoleBinding", "ig-instgenie-worker-discovery"),
        ("Deployment", "ig-instgenie-gateway"), ("Deployment", "ig-instgenie-minio"),
        ("Deployment", "ig-instgenie-scheduler"), ("Deployment", "ig-instgenie-worker"),
        ("HorizontalPodAutoscaler", "ig-instgenie-gateway"), ("PersistentVolumeClaim", "ig-instgenie-minio"),
        ("Pod", "ig-instgenie-smoke-test"),
        ("PodDisruptionBudget", "ig-instgenie-gateway"), ("PodDisruptionBudget", "ig-instgenie-worker"),
        ("Secret", "ig-instgenie-api-keys"), ("Secret", "ig-instgenie-s3"), ("Secret", "ig-instgenie-smoke-key"),
        ("Service", "ig-instgenie-gateway"), ("Service", "ig-instgenie-minio"), ("Service", "ig-instgenie-scheduler"),
        ("Service", "ig-instgenie-worker"), ("ServiceAccount", "ig-instgenie"),
    ])


def test_a_missing_tool_fails_in_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"helm is not installed; install it with `make tools` \(CI"):
        require(False, "helm", "make tools")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="install it with `make tools`"):
        require(False, "helm", "make tools")
    require(True, "helm", "make tools")
