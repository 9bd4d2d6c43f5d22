"""One engine loop over Flux, FLUX.1-Fill and UNet models and two resolutions: each result equals its run alone."""
from __future__ import annotations

import pytest

from instgenie.engine.editor import Editor
from instgenie.engine.errors import CacheMismatchError
from instgenie.engine.request import EditRequest
from instgenie.engine.serving.loop import EngineLoop
from instgenie.engine.serving.multi import MultiEditor
from instgenie.engine.step import batch_key
from instgenie.engine.template_cache import DirectoryBlobStore, TemplateStore
from instgenie.engine.editors import editor_for
from tests.engine.helpers import masks_for, random_image


def test_families_and_sizes_side_by_side_in_one_loop(tiny_model, fill_model, unet_model, tmp_path):
    store = TemplateStore(DirectoryBlobStore(tmp_path / "store"))
    flux, fill, unet = (editor_for(m, store) for m in (tiny_model, fill_model, unet_model))
    requests = []
    for editor, res, seed in [(flux, (128, 128), 1), (flux, (96, 160), 2), (fill, (128, 128), 3),
                              (unet, (128, 128), 4), (unet, (96, 160), 5)]:
        tpl = editor.register_template(random_image(res, seed), "a cat", steps=3, seed=seed)
        masks = masks_for(res)
        requests += [EditRequest(tpl.template_id, masks["disc"], "a dog", seed=seed),
                     EditRequest(tpl.template_id, masks["scattered"], "a boat", seed=seed + 10)]
    multi = MultiEditor([flux, fill, unet])
    keys = {batch_key(multi.start(r)) for r in requests}
    assert len(keys) == 5  # model and resolution keep them apart

    def alone(r):
        return multi.for_template(r.template_id).edit(r.template_id, r.mask, r.prompt, seed=r.seed).latents

    expected = {r.request_id: alone(r) for r in requests}
    loop = EngineLoop(multi, max_batch_size=4)
    try:
        handles = [loop.submit(r) for r in requests]
        for h in handles:
            got = h.result(timeout=120).latents
            assert (got - expected[h.request_id]).abs().max().item() < 1e-5, h.request_id
        assert max(loop.scheduler.stats.batch_sizes) > 1
    finally:
        loop.stop()


def test_a_template_of_a_model_not_served_is_a_mismatch(tiny_model, fill_model, tmp_path):
    store = TemplateStore(DirectoryBlobStore(tmp_path / "store"))
    tpl = Editor(fill_model, store).register_template(random_image((128, 128), 1), "p", steps=2)
    with pytest.raises(CacheMismatchError, match="flux-fill-tiny"):
        MultiEditor([Editor(tiny_model, store)]).for_template(tpl.template_id)
