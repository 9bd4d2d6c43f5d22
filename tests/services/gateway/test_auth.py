"""API keys: file and environment sources, hashed storage, and every way a bearer token can be wrong."""
from __future__ import annotations

import json

import grpc
import pytest

from instgenie.services.common.status import ServiceError
from instgenie.services.gateway.auth import ApiKeys, Tenant, digest


def bearer(token):
    return (("authorization", f"Bearer {token}"),)


def test_file_and_env_keys(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"tenants": {
        "acme": {"keys": ["acme-secret-1", "sha256:" + digest("acme-secret-2")], "max_in_flight": 3,
                 "models": ["digits-16px"]}}}))
    keys = ApiKeys.load(str(path), "beta:beta-secret-1")
    acme = keys.authenticate(bearer("acme-secret-1"))
    assert acme == keys.authenticate(bearer("acme-secret-2"))
    assert acme.name == "acme" and acme.max_in_flight == 3
    assert keys.authenticate(bearer("beta-secret-1")).name == "beta"
    # Only digests are kept.
    assert "acme-secret-1" not in repr(keys.__dict__)


@pytest.mark.parametrize("metadata, reason", [
    ((), "MISSING_API_KEY"),
    ((("authorization", "Basic abc"),), "MALFORMED_API_KEY"),
    ((("authorization", "Bearer "),), "MALFORMED_API_KEY"),
    (bearer("nope-nope-nope"), "INVALID_API_KEY"),
])
def test_bad_tokens_are_unauthenticated(metadata, reason):
    keys = ApiKeys.load(None, "acme:acme-secret-1")
    with pytest.raises(ServiceError) as err:
        keys.authenticate(metadata)
    assert err.value.info.code == grpc.StatusCode.UNAUTHENTICATED
    assert err.value.info.reason == reason


@pytest.mark.parametrize("env, match", [
    ("Acme:secret-12345", "tenant name"),
    ("acme:short", "at least 8"),
    ("acme-no-key", "tenant:key"),
])
def test_bad_key_configuration_fails_at_start(env, match):
    with pytest.raises(ValueError, match=match):
        ApiKeys.load(None, env)


def test_model_allow_list():
    tenant = Tenant("acme", models=frozenset({"digits-16px"}))
    tenant.check_model("digits-16px")
    with pytest.raises(ServiceError) as err:
        tenant.check_model("flux-tiny-seed0")
    assert err.value.info.code == grpc.StatusCode.PERMISSION_DENIED
