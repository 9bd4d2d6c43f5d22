"""Worker previews follow the model family's scheduler: a UNet's (DDIM, epsilon) x0 prediction close to the
result at the last step, a Flux preview exactly what the rectified-flow formula made before families."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from instgenie.engine.editor import Editor
from instgenie.engine.latents import tensor_to_image, unpack
from instgenie.engine.request import EditRequest
from instgenie.engine.template_cache import DirectoryBlobStore, TemplateStore
from instgenie.engine.unet.editor import UNetEditor
from instgenie.services.worker.service import _png, _preview_png
from tests.engine.helpers import masks_for, random_image

torch.set_num_threads(2)


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def run_to(editor, state, steps_done: int) -> None:
    while state.step_index < steps_done:
        assert not editor.step([state])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from instgenie.engine.models.loader import preset_model

    root = tmp_path_factory.mktemp("models")
    return {name: preset_model(name, root=root) for name in ("sd2-inpaint-tiny", "flux-tiny")}


def test_a_unet_preview_at_the_last_step_is_close_to_the_result(models, tmp_path):
    model = models["sd2-inpaint-tiny"]
    editor = UNetEditor(model, TemplateStore(DirectoryBlobStore(tmp_path)))
    res = model.info.resolution
    template = random_image(res, 5)
    tpl = editor.register_template(template, "a cat", seed=1, steps=8)
    mask = masks_for(res)["disc"] > 0
    state = editor.start(EditRequest(tpl.template_id, mask, "a dog", seed=2))
    start = state.latents
    previews = {}
    for k in (2, 7):  # the worker previews after a step, never after the last (that is the result)
        run_to(editor, state, k)
        previews[k] = _preview_png(editor, state, editor.preview_inputs(state, start))
        assert previews[k], "a UNet preview is made"
    run_to(editor, state, state.total_steps)
    result = np.asarray(editor.finish(state).image).astype(int)
    last, early = decode(previews[7]), decode(previews[2])
    assert last.shape == result.shape
    # outside the mask: the template's pixels, as the result
    assert np.array_equal(last[~mask], result[~mask]) and np.array_equal(last[~mask], template[~mask].astype(int))
    off = np.abs(last[mask] - result[mask]).mean()
    changed = np.abs(template[mask].astype(int) - result[mask]).mean()
    assert off < 0.02 * changed, f"last preview {off:.1f} off the result, the edit changed the mask by {changed:.1f}"
    assert off < np.abs(early[mask] - result[mask]).mean(), "previews converge on the result"


def old_flux_preview(editor, state, latents, start, sigma: float) -> bytes:
    """The worker's preview before model families (commit d48b76b), verbatim but for its error handling."""
    with torch.no_grad():
        x0 = (latents - sigma * start) / max(1.0 - sigma, 1e-3)
        h, w = editor.latent_grid(state.manifest.resolution)
        decoded = editor.model.codec.decode(unpack(x0, h, w))
        mask = state.mask.pixels.to(decoded.device)[None, None]
        decoded = torch.where(mask, decoded, state.template_image.to(decoded.dtype))
        image = tensor_to_image(decoded)
    return _png(image)


def test_a_flux_preview_is_unchanged(models, tmp_path):
    model = models["flux-tiny"]
    editor = Editor(model, TemplateStore(DirectoryBlobStore(tmp_path)))
    res = model.info.resolution
    tpl = editor.register_template(random_image(res, 6), "a cat", seed=1, steps=6)
    state = editor.start(EditRequest(tpl.template_id, masks_for(res)["unaligned"], "a dog", seed=3))
    start = state.latents
    for k in (1, 3, 5):
        run_to(editor, state, k)
        new = _preview_png(editor, state, editor.preview_inputs(state, start))
        old = old_flux_preview(editor, state, state.latents, start, float(state.sigmas[state.step_index]))
        assert new and new == old, f"step {k}: the Flux preview changed"
