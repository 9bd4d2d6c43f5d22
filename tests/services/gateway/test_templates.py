"""Template records on a real object store: tenant scoping, newest-first paging, settling abandoned records."""
from __future__ import annotations

import time

import pytest

from instgenie.services.gateway.templates import (CREATING, FAILED, READY, TemplateRecord, TemplateRecords,
                                                  decode_page_token, encode_page_token, new_template_id)


def record(tenant="acme", tid=None, state=READY, **kw):
    now = time.time()
    return TemplateRecord(template_id=tid or new_template_id(), tenant=tenant, name="n", state=state, model="m",
                          width=16, height=16, steps=20, prompt="3", cache_mode="kv", seed=0, guidance_scale=None,
                          create_time=now, update_time=now, **kw)


@pytest.fixture(params=["local", "s3"])
def records(request, tmp_path):
    if request.param == "local":
        from instgenie.services.common.objectstore import LocalObjectStore

        return TemplateRecords(LocalObjectStore(tmp_path / "store"), stale_after=60)
    return TemplateRecords(request.getfixturevalue("s3_store"), stale_after=60)


def test_ids_sort_newest_first():
    first = new_template_id()
    time.sleep(0.002)
    second = new_template_id()
    assert second < first and len(first) == 24


def test_records_are_tenant_scoped(records):
    r = record("acme")
    records.put(r)
    assert records.get("acme", r.template_id).to_json() == r.to_json()
    assert records.get("beta", r.template_id) is None


def test_paging_newest_first(records):
    ids = []
    for _ in range(5):
        r = record()
        records.put(r)
        ids.append(r.template_id)
        time.sleep(0.002)
    newest_first = sorted(ids)
    assert newest_first == ids[::-1]
    page, more = records.list_ids("acme", None, 2)
    assert page == newest_first[:2] and more
    page2, more2 = records.list_ids("acme", decode_page_token(encode_page_token(page[-1])), 2)
    assert page2 == newest_first[2:4] and more2
    page3, more3 = records.list_ids("acme", page2[-1], 2)
    assert page3 == newest_first[4:] and not more3


@pytest.mark.parametrize("token", ["", "garbage", "djE6bm90LWEtdGVtcGxhdGU=", "%%%"])
def test_foreign_page_tokens_are_refused(token):
    assert decode_page_token(token) is None


def test_abandoned_registration_is_settled(records):
    stale = record(state=CREATING)
    records.put(stale)
    # Fresh: left alone (someone may still be driving it).
    assert records.get("acme", stale.template_id).state == CREATING
    records.stale_after = 0.0
    settled = records.get("acme", stale.template_id)
    assert settled.state == FAILED and "interrupted" in settled.error
    # If the worker did commit the cache, the record becomes READY instead.
    done = record(state=CREATING)
    records.put(done)
    records.store.put(f"templates/{done.template_id}/manifest.json", b"{}")
    assert records.get("acme", done.template_id).state == READY


def test_delete_removes_record_cache_and_request_index(records):
    r = record(request_id="req-1")
    records.put(r)
    records.remember_request("acme", "req-1", r.template_id)
    records.store.put(f"templates/{r.template_id}/step-0000.safetensors", b"x")
    assert records.template_for_request("acme", "req-1") == r.template_id
    records.delete(r)
    assert records.get("acme", r.template_id) is None
    assert records.template_for_request("acme", "req-1") is None
    assert list(records.store.list(f"templates/{r.template_id}/")) == []
