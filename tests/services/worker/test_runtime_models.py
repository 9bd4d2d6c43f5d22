"""A worker serves the UNet and FLUX.1-Fill presets unchanged: the right editor, and a model description the
scheduler can place and price by (model id, input channels, token count, family, a UNet's shape)."""
from __future__ import annotations

import numpy as np
import pytest

from instgenie.engine.flops import UNetShape, unet_step_flops
from instgenie.engine.request import EditRequest
from instgenie.engine.template_cache import DirectoryBlobStore
from instgenie.services.scheduler.costmodel import ModelShape, request_flops
from instgenie.services.worker.runtime import WorkerConfig, WorkerRuntime
from tests.engine.helpers import masks_for, random_image


@pytest.mark.parametrize("preset, editor_class, in_channels, tokens", [
    ("sd2-inpaint-tiny", "UNetEditor", 9, 16 * 16),  # a UNet's tokens are its latent cells
    ("flux-fill-tiny", "Editor", 384, 8 * 8),
])
def test_worker_loads_the_family_and_edits(tmp_path, preset, editor_class, in_channels, tokens):
    runtime = WorkerRuntime(WorkerConfig("w1", model=preset, models_dir=str(tmp_path / "models"), pre_workers=1),
                            DirectoryBlobStore(tmp_path / "blobs"))
    runtime.load()
    try:
        assert runtime.load_error is None and runtime.ready.is_set()
        assert type(runtime.editor).__name__ == editor_class
        info = runtime.model_info()
        assert info.model_id == f"{preset}-seed0" and info.in_channels == in_channels and info.image_tokens == tokens
        # the family, and a UNet's shape: what the scheduler's FLOP count needs
        shape = ModelShape.from_proto(info)
        assert info.family == runtime.editor.model.info.family and shape.family == info.family
        if shape.is_unet:
            assert info.HasField("unet") and shape.unet == UNetShape.of(runtime.editor.model.transformer)
            assert request_flops(shape, 40) == 2 * unet_step_flops(shape.unet, tokens, info.text_tokens, 40) > 0
        else:
            assert not info.HasField("unet") and shape.unet is None
        res = runtime.editor.model.info.resolution
        tpl = runtime.editor.register_template(random_image(res, 1), "p", steps=2)
        result = runtime.loop.submit(EditRequest(tpl.template_id, masks_for(res)["disc"], "q")).result(timeout=60)
        assert result.steps == 2 and np.asarray(result.image).shape == (*res, 3)
    finally:
        runtime.close()
