"""values.yaml and values.schema.json: typos and wrong types fail the install, every value is documented, and the
schema describes exactly the keys values.yaml has."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.charts.chart_helpers import CHART, render_error

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES_TEXT = (CHART / "values.yaml").read_text()
VALUES = yaml.safe_load(VALUES_TEXT)
#: schema definitions of Kubernetes types: typo-checked by the schema, documented as one value in values.yaml
KUBERNETES_TYPES = {"#/definitions/resources"}


def _resolve(schema: dict) -> dict:
    if "$ref" in schema and schema["$ref"] not in KUBERNETES_TYPES:
        return SCHEMA["definitions"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


@pytest.mark.parametrize("typo, where", [
    ("gateway.replicaCont=3", "/gateway': additional properties 'replicaCont'"),
    ("worker.gpu.resourcename=amd.com/gpu", "/worker/gpu': additional properties 'resourcename'"),
    ("scheduler.replicaCount=2", "/scheduler': additional properties 'replicaCount'"),
    ("minio.persistance.enabled=false", "/minio': additional properties 'persistance'"),
    ("worker.resources.limit.memory=8Gi", "/worker/resources': additional properties 'limit'"),
    ("gateway.probes.liveness.periodSecond=5", "/gateway/probes/liveness': additional properties"),
    ("smokeTests.enabled=false", "additional properties 'smokeTests'"),
])
def test_a_typo_in_values_fails(typo, where):
    assert where in render_error(None, typo)


@pytest.mark.parametrize("bad, where", [
    ("worker.gpu.count=one", "/worker/gpu/count"),
    ("gateway.port=70000", "/gateway/port"),
    ("scheduler.policy=fastest", "/scheduler/policy"),
    ("worker.hostCache.memoryLimitPercent=95", "/worker/hostCache/memoryLimitPercent"),
    ("logLevel=verbose", "/logLevel"),
    ("gateway.apiKeys.tenants.Bad_Name.keys={abcdefgh12}", "'Bad_Name' does not match pattern"),
    ("gateway.apiKeys.tenants.acme.max_in_flight=0", "/gateway/apiKeys/tenants/acme/max_in_flight"),
    ("objectStore.bucket=Bad_Bucket", "/objectStore/bucket"),
])
def test_a_wrong_value_fails(bad, where):
    assert where in render_error(None, bad)


def _leaf_paths(schema: dict, prefix: str = "") -> list[str]:
    """Paths of the values the schema spells out; a free-form object (resources, tenants, ...) is one leaf."""
    schema = _resolve(schema)
    props = schema.get("properties")
    if schema.get("type") != "object" or not props or schema.get("additionalProperties") is not False:
        return [prefix]
    return [p for key, sub in props.items() for p in _leaf_paths(sub, f"{prefix}.{key}" if prefix else key)]


def _value_paths(values, prefix: str = "", schema=SCHEMA) -> list[str]:
    schema = _resolve(schema)
    if not (isinstance(values, dict) and schema.get("additionalProperties") is False and schema.get("properties")):
        return [prefix]
    return [p for key, sub in values.items()
            for p in _value_paths(sub, f"{prefix}.{key}" if prefix else key, schema["properties"].get(key, {}))]


def test_the_schema_spells_out_exactly_the_keys_of_values_yaml():
    schema_paths, value_paths = set(_leaf_paths(SCHEMA)), set(_value_paths(VALUES))
    assert schema_paths - value_paths == set(), "in the schema, not in values.yaml (undocumented options)"
    assert value_paths - schema_paths == set(), "in values.yaml, not in the schema"


def _documented_keys(text: str) -> dict[str, bool]:
    """Every key line of values.yaml -> whether a `# --` comment block sits right above it."""
    documented, stack, comment_block = {}, [], []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment_block.append(stripped)
            continue
        match = re.match(r"^( *)([A-Za-z_][\w.-]*):", line)
        if match and not stripped.startswith("-"):
            depth = len(match.group(1)) // 2
            stack[depth:] = [match.group(2)]
            documented[".".join(stack)] = bool(comment_block) and comment_block[0].startswith("# --")
        comment_block = []
    return documented


def test_every_value_is_documented_helm_docs_style():
    documented = _documented_keys(VALUES_TEXT)
    missing = [path for path in _leaf_paths(SCHEMA) if not documented.get(path)]
    assert missing == [], "values without a `# --` comment right above them"


def test_the_documentation_check_notices_a_missing_comment():
    text = VALUES_TEXT.replace("  # -- gRPC port of the scheduler (container and Service).\n", "")
    assert text != VALUES_TEXT
    documented = _documented_keys(text)
    assert documented["scheduler.port"] is False and documented["scheduler.policy"] is True
