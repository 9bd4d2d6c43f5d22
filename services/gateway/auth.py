"""Tenants and their API keys: bearer tokens in call metadata, keys kept only as sha256 digests.

Keys come from a JSON file and/or the INSTGENIE_API_KEYS variable:

    {"tenants": {"acme": {"keys": ["sha256:9f86d0...", "a-plain-key"], "max_in_flight": 16,
                          "models": ["digits-16px"]}}}

    INSTGENIE_API_KEYS="acme:key1,beta:key2"

A key in the file may be written as "sha256:<hex digest>" so the file holds no secret; a plain key is hashed
on load and the plain text dropped. `models`, when present, limits the models a tenant may create templates
on (others are PERMISSION_DENIED); `max_in_flight` limits its edits in flight across the cluster.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import grpc

from ..common.status import ServiceError

TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
DEFAULT_MAX_IN_FLIGHT = 64


@dataclass(frozen=True)
class Tenant:
    name: str
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    models: frozenset[str] | None = None  # None: every model

    def check_model(self, model: str) -> None:
        if self.models is not None and model not in self.models:
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED, f"tenant {self.name!r} may not use model "
                               f"{model!r}; allowed: {sorted(self.models)}", reason="MODEL_NOT_ALLOWED")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    def __init__(self):
        self._by_digest: dict[str, Tenant] = {}

    def __len__(self) -> int:
        return len(self._by_digest)

    def add(self, tenant: Tenant, key: str) -> None:
        if not TENANT_NAME.match(tenant.name):
            raise ValueError(f"tenant name {tenant.name!r}: use 1-32 of a-z, 0-9 and '-' (it names object keys)")
        if key.startswith("sha256:"):
            hexdigest = key.removeprefix("sha256:").lower()
            if not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
                raise ValueError(f"tenant {tenant.name!r}: a sha256: key needs 64 hex digits")
        else:
            if len(key) < 8:
                raise ValueError(f"tenant {tenant.name!r}: API keys must have at least 8 characters")
            hexdigest = digest(key)
        self._by_digest[hexdigest] = tenant

    @classmethod
    def load(cls, path: str | None = None, env_value: str | None = None) -> "ApiKeys":
        keys = cls()
        if path:
            data = json.loads(Path(path).read_text())
            for name, spec in (data.get("tenants") or {}).items():
                models = spec.get("models")
                tenant = Tenant(name, int(spec.get("max_in_flight", DEFAULT_MAX_IN_FLIGHT)),
                                frozenset(models) if models is not None else None)
                for key in spec.get("keys", []):
                    keys.add(tenant, key)
        for item in filter(None, (env_value or "").split(",")):
            name, sep, key = item.strip().partition(":")
            if not sep:
                raise ValueError("INSTGENIE_API_KEYS entries are tenant:key, comma-separated")
            keys.add(Tenant(name), key)
        return keys

    def authenticate(self, metadata) -> Tenant:
        """The tenant of the call's bearer token; UNAUTHENTICATED with what to fix otherwise."""
        header = ""
        for key, value in metadata or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode(errors="replace")
                break
        if not header:
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "missing API key: send call metadata "
                               "'authorization: Bearer <key>'", reason="MISSING_API_KEY")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "the authorization metadata must be "
                               "'Bearer <key>'", reason="MALFORMED_API_KEY")
        # Looking up the key's digest (not the key) leaks nothing through timing: an attacker cannot choose
        # inputs whose digests probe the table.
        tenant = self._by_digest.get(digest(token.strip()))
        if tenant is None:
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "unknown API key", reason="INVALID_API_KEY")
        return tenant
