"""Template caches on a real S3 server: round trip, corruption, outage, and a small host-memory tier."""
from __future__ import annotations

import time

import numpy as np
import pytest

from instgenie.engine.cache_provider import HostTierProvider
from instgenie.engine.editor import Editor
from instgenie.engine.errors import CacheUnavailableError
from instgenie.engine.template_cache import DirectoryBlobStore, TemplateStore, step_shard
from instgenie.engine.tiers.host_cache import HostCache
from instgenie.services.common.testing_s3 import S3Server
from tests.engine.helpers import masks_for, random_image


@pytest.fixture()
def s3_editor(tiny_model, s3_store):
    return Editor(tiny_model, TemplateStore(s3_store))


def test_round_trip_matches_a_local_store(tiny_model, s3_editor, tmp_path):
    local = Editor(tiny_model, TemplateStore(DirectoryBlobStore(tmp_path)))
    res = tiny_model.info.resolution
    image, mask = random_image(res, 1), masks_for(res)["disc"]
    on_s3 = s3_editor.register_template(image, "a", steps=3)
    on_disk = local.register_template(image, "a", steps=3)
    assert on_s3.template_id == on_disk.template_id and on_s3.shards == on_disk.shards
    # A fresh editor reads the cache back from S3 only.
    reader = Editor(tiny_model, TemplateStore(s3_editor.store.blobs))
    a = reader.edit(on_s3.template_id, mask, "b", seed=3)
    b = local.edit(on_disk.template_id, mask, "b", seed=3)
    assert a.degraded is None and (a.latents - b.latents).abs().max().item() == 0.0
    assert reader.store.list() == [on_s3.template_id]


def test_corrupt_shard_on_s3_is_detected_and_the_edit_falls_back(s3_editor, tiny_model):
    res = tiny_model.info.resolution
    tpl = s3_editor.register_template(random_image(res, 2), "a", steps=3)
    key = f"templates/{tpl.template_id}/{step_shard(1)}"
    blobs = s3_editor.store.blobs
    data = bytearray(blobs.get(key)); data[-7] ^= 0x10
    blobs.put(key, bytes(data))
    result = s3_editor.edit(tpl.template_id, masks_for(res)["disc"], "b", seed=1)
    assert result.degraded is not None and "corrupt" in result.degraded


def test_server_down_gives_a_clear_error_or_full_compute_without_hanging(tiny_model, tmp_path):
    res = tiny_model.info.resolution
    with S3Server(tmp_path / "s3") as server:
        store = server.store("outage")
        editor = Editor(tiny_model, TemplateStore(store))
        tpl = editor.register_template(random_image(res, 3), "a", steps=3)
        state = editor.start(__import__("instgenie.engine.request", fromlist=["EditRequest"]).EditRequest(
            tpl.template_id, masks_for(res)["disc"], "b"))
        server.stop()
        t0 = time.monotonic()
        while not state.done:  # the step shards are not resident: every read meets the dead server
            editor.step([state])
        assert state.degraded is not None and "CacheUnavailableError" in state.degraded
        with pytest.raises(CacheUnavailableError, match="unreachable"):
            editor.edit(tpl.template_id, masks_for(res)["disc"], "b")
        assert time.monotonic() - t0 < 60


def test_lru_eviction_under_a_small_budget_keeps_results_correct(tiny_model, s3_store):
    res = tiny_model.info.resolution
    reference = Editor(tiny_model, TemplateStore(s3_store))
    templates = [reference.register_template(random_image(res, i), "a", steps=4) for i in range(2)]
    one_step = sum(t.numel() * t.element_size() for t in reference.store.step(templates[0], 0).values())
    host = HostCache(budget_bytes=3 * one_step)  # less than one template (4 steps)
    tiered = Editor(tiny_model, TemplateStore(s3_store), cache=HostTierProvider(reference.store, host))
    mask = masks_for(res)["unaligned"]
    try:
        for round_ in range(2):
            for tpl in templates:
                tiered.prefetch(tpl.template_id)
                got = tiered.edit(tpl.template_id, mask, "b", seed=round_)
                want = reference.edit(tpl.template_id, mask, "b", seed=round_)
                assert got.degraded is None
                assert (got.latents - want.latents).abs().max().item() == 0.0
        stats = host.stats()
        assert stats.evictions > 0 and stats.bytes <= 3 * one_step
    finally:
        host.close()
