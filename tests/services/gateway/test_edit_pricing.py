"""What the gateway tells the scheduler to price an edit with: the template's own image tokens and cache mode,
and masked tokens counted the way the template's model computes them (a UNet: latent cells; Flux: 2x2 cells)."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from instgenie.engine.images import mask_tokens
from instgenie.engine.unet.editor import latent_mask
from instgenie.gateway.v1 import edit_service_pb2 as pb
from instgenie.services.gateway import validation as v
from instgenie.services.gateway.auth import Tenant
from instgenie.services.gateway.service import GatewayConfig, GatewayService
from instgenie.services.gateway.templates import READY, TemplateRecord, new_template_id
from instgenie.worker.v1 import worker_service_pb2 as wpb
from tests.services.mesh_helpers import png

# What the workers of three presets announce (services/worker/runtime.py model_info).
DIGITS = wpb.ModelInfo(model_id="digits-16px", width=16, height=16, scale_factor=1, image_tokens=64, cell=2,
                       family="flux", cache_modes=["kv", "y"], max_steps=100)
FLUX = wpb.ModelInfo(model_id="flux-tiny-seed0", width=128, height=128, scale_factor=8, image_tokens=64, cell=16,
                     family="flux", cache_modes=["kv", "y"], max_steps=100)
UNET = wpb.ModelInfo(model_id="sd2-inpaint-tiny-seed0", width=128, height=128, scale_factor=8, image_tokens=256,
                     cell=32, family="unet-inpaint", cache_modes=["o"], max_steps=100)


@pytest.mark.parametrize("model", [DIGITS, FLUX, UNET], ids=lambda m: m.model_id)
def test_template_tokens_of_the_default_size_are_what_the_worker_announces(model):
    assert v.template_tokens(model, model.width, model.height) == model.image_tokens


def test_template_tokens_follow_the_templates_size():
    assert v.template_tokens(FLUX, 256, 128) == 16 * 8  # 16 px tokens
    assert v.template_tokens(UNET, 160, 96) == 20 * 12  # a UNet's tokens: 8 px latent cells
    assert v.template_tokens(DIGITS, 32, 48) == 16 * 24  # 2 px tokens of a pixel-space model


@pytest.mark.parametrize("dilate", [0, 1, 2])
def test_unet_masked_tokens_are_the_engines_latent_cells(dilate):
    rng = np.random.default_rng(dilate)
    for density in (0.0005, 0.01, 0.2):
        mask = rng.random((96, 160)) < density
        engine = latent_mask(torch.from_numpy(mask), 8, dilate)
        assert mask_tokens(mask, 8, dilate, pack=1) == int(engine.tokens.sum())


def edit_request_for(model: wpb.ModelInfo, width: int, height: int, mask: np.ndarray, mode: str):
    """The scheduler's EditRequest the gateway builds for an edit of a ready template of `model`."""
    async def main():
        service = GatewayService(GatewayConfig(scheduler="127.0.0.1:9"), keys=None, records=None)
        service._models, service._models_at = {model.model_id: model}, time.monotonic() + 3600
        now = time.time()
        record = TemplateRecord(template_id=new_template_id(), tenant="t", name="", state=READY, model=model.model_id,
                                width=width, height=height, steps=4, prompt="p", cache_mode=mode, seed=0,
                                guidance_scale=None, create_time=now, update_time=now, cache_bytes=1234)

        async def found(tenant, template_id, fresh=False):
            return record
        service._record = found
        try:
            request, _ = await service._prepare_edit(Tenant("t"), pb.EditRequest(
                template_id=record.template_id, mask=png(mask), prompt="q", request_id="r1"))
            return request
        finally:
            await service.close()
    return asyncio.run(main())


def test_a_unet_edit_is_priced_at_its_templates_size_in_latent_cells():
    mask = np.zeros((96, 160), np.uint8)
    mask[32:64, 64:128] = 255  # 4 x 8 latent cells
    req = edit_request_for(UNET, 160, 96, mask, "o")
    assert (req.image_tokens, req.masked_tokens, req.cache_mode) == (240, 32, "o")
    assert req.cache_bytes == 1234 and req.steps == 4 and req.model == UNET.model_id


def test_a_flux_edit_is_priced_at_its_templates_size_and_mode():
    mask = np.zeros((128, 256), np.uint8)
    mask[32:64, 64:128] = 255  # 2 x 4 tokens of 16 px
    req = edit_request_for(FLUX, 256, 128, mask, "y")
    assert (req.image_tokens, req.masked_tokens, req.cache_mode) == (128, 8, "y")
