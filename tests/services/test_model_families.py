"""One mesh serving two model families: a UNet (SD2-inpainting shape) and the digits Flux model side by side.

The gateway picks the model by the image's size (a template may be any size on its model's token grid), the
cache mode defaults to the model's own (o for a UNet), and the scheduler places each edit on a worker of its
template's model.
"""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from instgenie.gateway.v1 import edit_service_pb2 as pb

from .mesh_helpers import auth, channel, create_template, decode, digit, half_mask, png, start_mesh, stub

UNET = "sd2-inpaint-tiny"


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    mesh = start_mesh(tmp_path_factory.mktemp("families"), workers=1, model=UNET)
    try:
        mesh.add_worker(extra=["--model", "digits"])
        mesh.wait_registered(2, timeout=120)
        with channel(mesh) as ch:
            yield mesh, stub(ch)
    finally:
        mesh.stop()


def unet_image(height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_a_unet_template_of_its_own_size_records_o_caches_and_edits(families):
    mesh, gw = families
    # 96x160 is not the preset's 128x128, but its sides are multiples of the UNet's 32 px token cell.
    template_id = create_template(gw, image=unet_image(96, 160), prompt="a red square")
    t = gw.GetTemplate(pb.GetTemplateRequest(template_id=template_id), metadata=auth(), timeout=10).template
    assert t.model == f"{UNET}-seed0" and (t.width, t.height) == (160, 96)
    assert t.cache_mode == pb.CACHE_MODE_O
    mask = np.zeros((96, 160), np.uint8)
    mask[32:64, 64:128] = 255
    result = gw.Edit(pb.EditRequest(template_id=template_id, mask=png(mask), prompt="a blue circle", seed=3,
                                    request_id="unet-1"), metadata=auth(), timeout=120).result
    image = decode(result.image)
    assert image.shape[:2] == (96, 160) and result.worker == "worker-1"
    # Outside the mask the edit keeps the template (the inpaint blend on the UNet path too).
    outside = np.ones((96, 160), bool)
    outside[16:80, 48:144] = False  # the masked box and a margin the VAE's receptive field may touch
    assert np.abs(image[outside].astype(int) - unet_image(96, 160)[outside].astype(int)).mean() < 8


def test_the_digits_template_goes_to_the_digits_worker(families):
    _, gw = families
    template_id = create_template(gw, image=digit(3), prompt="3")
    t = gw.GetTemplate(pb.GetTemplateRequest(template_id=template_id), metadata=auth(), timeout=10).template
    assert t.model.startswith("digits") and t.cache_mode == pb.CACHE_MODE_KV
    result = gw.Edit(pb.EditRequest(template_id=template_id, mask=png(half_mask()), prompt="8", seed=1,
                                    request_id="digits-1"), metadata=auth(), timeout=60).result
    assert result.worker == "worker-2" and decode(result.image).shape[:2] == (16, 16)


def test_a_cache_mode_the_model_does_not_record_is_refused(families):
    _, gw = families
    with pytest.raises(grpc.RpcError) as err:
        gw.CreateTemplate(pb.CreateTemplateRequest(image=png(unet_image(128, 128)), prompt="p",
                                                   cache_mode=pb.CACHE_MODE_KV), metadata=auth(), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "records cache modes o" in err.value.details()


def test_a_size_off_every_token_grid_is_refused_with_the_grids(families):
    _, gw = families
    with pytest.raises(grpc.RpcError) as err:
        gw.CreateTemplate(pb.CreateTemplateRequest(image=png(unet_image(99, 101)), prompt="p"), metadata=auth(),
                          timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "multiples of 32 px" in err.value.details() and "multiples of 2 px" in err.value.details()


def test_a_unet_edit_streams_previews_made_with_its_own_scheduler(families):
    _, gw = families
    template_id = create_template(gw, image=unet_image(128, 128), prompt="a red square")
    mask = np.zeros((128, 128), np.uint8)
    mask[32:96, 40:104] = 255
    request = pb.StreamEditRequest(edit=pb.EditRequest(template_id=template_id, mask=png(mask), prompt="a circle",
                                                       seed=5, preview_every_steps=1))
    events = list(gw.StreamEdit(request, metadata=auth(), timeout=120))
    progress = [e.progress for e in events if e.WhichOneof("event") == "progress"]
    # The preset's 4 steps: a preview after each but the last (whose picture is the result).
    assert [p.step for p in progress if p.preview] == [1, 2, 3]
    result = decode(events[-1].result.image).astype(int)
    inside = mask > 0
    off = [np.abs(decode(p.preview).astype(int)[inside] - result[inside]).mean() for p in progress if p.preview]
    changed = np.abs(unet_image(128, 128)[inside].astype(int) - result[inside]).mean()
    assert off[-1] < 0.1 * changed, f"the last preview is {off[-1]:.1f} off the result (the edit changed {changed:.1f})"
