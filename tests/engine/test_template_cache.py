"""Template cache format: the size formula, integrity checks and lookups."""
from __future__ import annotations

import numpy as np
import pytest

from instgenie.engine.errors import CacheIntegrityError, TemplateNotFoundError
from instgenie.engine.template_cache import cache_bytes, step_shard
from tests.engine.helpers import random_image


@pytest.mark.parametrize("mode", ["kv", "y"])
def test_cache_size_formula_matches_the_bytes_written(tiny_editor, mode):
    model = tiny_editor.model
    manifest = tiny_editor.register_template(random_image(model.info.resolution), "p", mode=mode, steps=3)
    tensor_bytes = 0
    for step in range(manifest.steps):
        tensors = tiny_editor.store.step(manifest, step)
        tensor_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
    expected = cache_bytes(mode, steps=3, branches=1, blocks=model.num_blocks, tokens=manifest.image_tokens,
                           hidden=model.transformer.inner_dim, element_bytes=4)
    assert tensor_bytes == expected == manifest.expected_cache_bytes
    written = sum(manifest.shards[step_shard(i)]["bytes"] for i in range(3))
    # safetensors adds only a JSON header per shard
    assert expected < written < expected + 3 * 8192


def test_registration_is_idempotent_and_listed(tiny_editor):
    img = random_image(tiny_editor.model.info.resolution, 3)
    a = tiny_editor.register_template(img, "p", steps=2)
    b = tiny_editor.register_template(img, "p", steps=2)
    assert a.template_id == b.template_id
    assert tiny_editor.store.list() == [a.template_id]
    tiny_editor.delete_template(a.template_id)
    assert tiny_editor.store.list() == []
    with pytest.raises(TemplateNotFoundError):
        tiny_editor.delete_template(a.template_id)


def test_corrupt_shard_is_detected(tiny_editor, tmp_path):
    manifest = tiny_editor.register_template(random_image(tiny_editor.model.info.resolution), "p", steps=2)
    path = tmp_path / "store" / "templates" / manifest.template_id / step_shard(1)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CacheIntegrityError, match="corrupt"):
        tiny_editor.store.step(manifest, 1)
    path.unlink()
    with pytest.raises(CacheIntegrityError, match="missing"):
        tiny_editor.store.step(manifest, 1)


def test_unknown_template(tiny_editor):
    with pytest.raises(TemplateNotFoundError, match="register it first"):
        tiny_editor.edit("tpl-nope", None, "x")


def test_corrupt_shard_mid_edit_falls_back_to_full_compute(tiny_editor, tmp_path):
    """A corrupt cache never yields a wrong image: from the bad step on, every token is computed."""
    res = tiny_editor.model.info.resolution
    manifest = tiny_editor.register_template(random_image(res, 2), "p", steps=3)
    path = tmp_path / "store" / "templates" / manifest.template_id / step_shard(0)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    mask = np.zeros(res); mask[10:60, 20:90] = 1
    degraded = tiny_editor.edit(manifest.template_id, mask, "q", seed=1)
    full = tiny_editor.edit(manifest.template_id, mask, "q", seed=1, path="full")
    assert "corrupt" in degraded.degraded and full.degraded is None
    assert (degraded.latents - full.latents).abs().max().item() < 1e-5
    with pytest.raises(Exception, match="corrupt"):
        tiny_editor.edit(manifest.template_id, mask, "q", seed=1, fallback_to_full=False)
