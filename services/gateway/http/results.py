"""`response_format=url`: result images kept in the object store for a while, behind unguessable URLs.

    tenants/<tenant>/results/<expiry, unix seconds, 10 digits>-<32 random hex>.png

The name is the capability (like a presigned URL): 128 random bits, and the expiry is part of the key, so it
cannot be extended by editing the URL. Any gateway replica serves it (it reads the store). Expired objects
are refused at once and deleted lazily: names sort by expiry, so a sweep lists a tenant's prefix and stops at
the first live one.
"""
from __future__ import annotations

import re
import secrets
import time

from ...common.objectstore import ObjectNotFound, ObjectStore

_NAME = re.compile(r"^([0-9]{10})-([0-9a-f]{32})\.png$")
_TENANT = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


class ResultLinks:
    def __init__(self, store: ObjectStore, ttl_seconds: float = 3600.0, sweep_every: float = 60.0):
        self.store = store
        self.ttl = ttl_seconds
        self.sweep_every = sweep_every
        self._swept: dict[str, float] = {}

    @staticmethod
    def _key(tenant: str, name: str) -> str:
        return f"tenants/{tenant}/results/{name}"

    def put(self, tenant: str, png: bytes) -> tuple[str, int]:
        """Store a result; returns (URL path, expiry in unix seconds). Blocking: call it from a thread."""
        expires = int(time.time() + self.ttl)
        name = f"{expires:010d}-{secrets.token_hex(16)}.png"
        self.store.put(self._key(tenant, name), png)
        self._sweep(tenant)
        return f"/v1/images/results/{tenant}/{name}", expires

    def get(self, tenant: str, name: str) -> bytes | None:
        """The image, or None if the name is not one of ours, has expired, or is gone."""
        m = _NAME.match(name)
        if not m or not _TENANT.match(tenant) or int(m.group(1)) < time.time():
            return None
        try:
            return self.store.get(self._key(tenant, name))
        except ObjectNotFound:
            return None

    def _sweep(self, tenant: str) -> None:
        now = time.time()
        if now - self._swept.get(tenant, 0.0) < self.sweep_every:
            return
        self._swept[tenant] = now
        prefix = self._key(tenant, "")
        for key in self.store.list(prefix):
            m = _NAME.match(key[len(prefix):])
            if m and int(m.group(1)) >= now:
                break  # sorted by expiry: the rest are live
            self.store.delete(key)
