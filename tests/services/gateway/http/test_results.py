"""response_format=url storage: unguessable names carrying their expiry, refused once expired, swept lazily."""
from __future__ import annotations

import time

from instgenie.services.common.objectstore import LocalObjectStore
from instgenie.services.gateway.http.results import ResultLinks


def test_links_serve_until_expiry_and_sweeping_removes_only_expired(tmp_path, monkeypatch):
    store = LocalObjectStore(tmp_path / "store")
    links = ResultLinks(store, ttl_seconds=100, sweep_every=0)
    path, expires = links.put("alpha", b"png-1")
    tenant, name = path.split("/")[-2:]
    assert path.startswith("/v1/images/results/alpha/") and tenant == "alpha"
    assert abs(expires - (time.time() + 100)) < 5 and name.startswith(f"{expires:010d}-")
    assert links.get("alpha", name) == b"png-1"
    assert links.get("beta", name) is None, "a link names its tenant's object only"
    for forged in (name.replace(".png", ".jpg"), "9" * 10 + name[10:], "../" + name, name[:-6] + ".png"):
        assert links.get("alpha", forged) is None
    # Later, the first link has expired: refused at once, and gone after the next put sweeps.
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 200)
    assert links.get("alpha", name) is None
    second, _ = links.put("alpha", b"png-2")
    assert [k.rsplit("/", 1)[1] for k in store.list("tenants/alpha/results/")] == [second.rsplit("/", 1)[1]]
    assert links.get("alpha", second.rsplit("/", 1)[1]) == b"png-2"
