"""Per-template resolution: any size the model supports, exact at each size, kept apart in the batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from instgenie.engine.errors import CacheMismatchError, InvalidImageError
from instgenie.engine.latents import unpack
from instgenie.engine.request import EditRequest
from instgenie.engine.serving.loop import EngineLoop
from instgenie.engine.step import batch_key
from instgenie.engine.template_cache import cache_bytes, step_shard
from tests.engine.helpers import masks_for, random_image

#: flux-tiny serves 128x128 by default; its token cell is 16 px, so 96x160 (6 x 10 tokens) is a valid size
WIDE = (96, 160)


@pytest.mark.parametrize("mode", ["kv", "y"])
def test_non_square_template_sparse_matches_dense_for_every_mask(tiny_editor, mode):
    manifest = tiny_editor.register_template(random_image(WIDE, 21), "a wide cat", mode=mode, seed=2)
    assert manifest.resolution == WIDE and manifest.image_tokens == 6 * 10
    for name, mask in masks_for(WIDE).items():
        sparse = tiny_editor.edit(manifest.template_id, mask, "a wide dog", seed=4)
        dense = tiny_editor.edit(manifest.template_id, mask, "a wide dog", seed=4, path="dense")
        err = (sparse.latents - dense.latents).abs().max().item()
        assert err < 1e-5, f"{mode}/{name}: sparse differs from the dense reference by {err}"
        assert sparse.image.size == (WIDE[1], WIDE[0])


def test_non_square_full_mask_equals_stock_pipeline_and_empty_mask_returns_template(tiny_editor):
    model = tiny_editor.model
    template = Image.fromarray(random_image(WIDE, 22))
    manifest = tiny_editor.register_template(template, "a cat", mode="kv", seed=3)
    ours = tiny_editor.edit(manifest.template_id, np.ones(WIDE), "a dog", seed=5)
    h, w = tiny_editor.latent_grid(WIDE)
    stock = model.pipeline(
        prompt="a dog", image=template, mask_image=Image.fromarray(np.full(WIDE, 255, np.uint8)),
        height=WIDE[0], width=WIDE[1], strength=1.0, num_inference_steps=manifest.steps,
        latents=unpack(tiny_editor._noise(5, WIDE), h, w), output_type="latent", max_sequence_length=8,
    ).images
    assert (stock - ours.latents).abs().max().item() < 1e-5
    same = tiny_editor.edit(manifest.template_id, np.zeros(WIDE), "x", seed=9, allow_empty_mask=True)
    assert torch.equal(same.latents, tiny_editor.store.shard(manifest, "base.safetensors")["image_latents"])
    assert np.array_equal(np.asarray(same.image), np.asarray(template))


def test_cache_size_follows_the_template_token_count(tiny_editor):
    model = tiny_editor.model
    for res in [(128, 128), WIDE, (48, 32)]:
        manifest = tiny_editor.register_template(random_image(res, 3), "p", mode="kv", steps=2, seed=1)
        tokens = (res[0] // 16) * (res[1] // 16)
        assert manifest.image_tokens == tokens
        data = sum(t.numel() * t.element_size() for i in range(2)
                   for t in tiny_editor.store.shard(manifest, step_shard(i)).values())
        assert data == cache_bytes("kv", 2, 1, model.num_blocks, tokens, model.transformer.inner_dim, 4)


def test_sizes_off_the_token_grid_are_refused(tiny_editor):
    for bad in [(100, 128), (128, 8), (16, 24)]:
        with pytest.raises(InvalidImageError, match="multiples of 16"):
            tiny_editor.register_template(np.zeros((*bad, 3), np.uint8), "p")


def test_a_manifest_of_an_unservable_size_is_a_mismatch(tiny_editor):
    manifest = tiny_editor.register_template(random_image(WIDE, 1), "p", steps=2)
    manifest.resolution = (100, 160)
    with pytest.raises(CacheMismatchError, match="size"):
        tiny_editor._check_manifest(manifest)


def test_two_resolutions_side_by_side_in_the_engine_loop(tiny_editor):
    square = tiny_editor.register_template(random_image((128, 128), 1), "square", steps=4, seed=1)
    wide = tiny_editor.register_template(random_image(WIDE, 2), "wide", steps=4, seed=2)
    requests = [
        EditRequest(square.template_id, masks_for((128, 128))["disc"], "a boat", seed=3),
        EditRequest(wide.template_id, masks_for(WIDE)["unaligned"], "a tree", seed=4),
        EditRequest(square.template_id, masks_for((128, 128))["scattered"], "a cat", seed=5),
        EditRequest(wide.template_id, masks_for(WIDE)["disc"], "a dog", seed=6),
    ]
    keys = {batch_key(tiny_editor.start(r)) for r in requests}
    assert len(keys) == 2  # the resolution is part of the key: the two sizes never share a step

    def alone(r):
        return tiny_editor.edit(r.template_id, r.mask, r.prompt, seed=r.seed).latents

    expected = {r.request_id: alone(r) for r in requests}
    loop = EngineLoop(tiny_editor, max_batch_size=4)
    try:
        handles = [loop.submit(r) for r in requests]
        for h in handles:
            got = h.result(timeout=60).latents
            assert got.shape == expected[h.request_id].shape
            assert (got - expected[h.request_id]).abs().max().item() < 1e-5
        assert max(loop.scheduler.stats.batch_sizes) > 1  # same-size requests did share steps
    finally:
        loop.stop()
