"""The cost model counts each request at its own template's size, and a UNet model with the UNet FLOP count:
request FLOPs, the placement timeline and the step-by-step simulation, the announced shape and its JSON form."""
from __future__ import annotations

import dataclasses

import pytest

from instgenie.engine.flops import UNetShape, cached_attention_flops, step_flops, unet_step_flops
from instgenie.services.scheduler.costmodel import (UNET, AnalyticalCostModel, FittedCostModel, ModelShape,
                                                    request_cached_flops, request_flops)
from instgenie.services.scheduler.placement import (PlacementRequest, Work, WorkerView, predict_finish,
                                                    simulate_finish)
from instgenie.services.scheduler.profile import Profile, Transfer
from instgenie.worker.v1 import worker_service_pb2 as wpb

FLUX = ModelShape("flux", image_tokens=64, text_tokens=8, hidden=32, dual_blocks=1, single_blocks=2, in_channels=64,
                  out_channels=64, branches=1)
SD2 = UNetShape(channels=(32, 64, 64), layers=(1, 1, 1), down_attention=(True, True, False),
                up_attention=(True, True, False), transformer_layers=(1, 1, 1), mid_attention=True,
                cross_attention_dim=32, in_channels=9, out_channels=4, time_embed_dim=128)
UNET_SHAPE = ModelShape("sd2", image_tokens=256, text_tokens=77, hidden=0, dual_blocks=0, single_blocks=0,
                        in_channels=9, out_channels=4, branches=2, family=UNET, unet=SD2)


def test_flux_flops_are_counted_at_the_templates_size():
    # A 256x256 template of a 128 px model: 256 image tokens, not the default 64.
    got = request_flops(FLUX, 20, "kv", "split", image_tokens=256)
    assert got == step_flops(FLUX.flux, 256, 8, 20, "kv", "split")
    assert request_flops(FLUX, 20, "kv", "split") == step_flops(FLUX.flux, 64, 8, 20, "kv", "split")
    assert got > request_flops(FLUX, 20, "kv", "split")
    # the cached-key passes (the d term) over the template's own keys
    assert request_cached_flops(FLUX, 20, "kv", "split", 256) == cached_attention_flops(FLUX.flux, 256, 8, 20)
    assert request_flops(FLUX, 20, "kv", "split", 0.5, 256) == pytest.approx(
        got + 0.5 * cached_attention_flops(FLUX.flux, 256, 8, 20))
    # masked tokens are capped at the template's tokens, not the default's
    assert request_flops(FLUX, 200, "y", image_tokens=256) > request_flops(FLUX, 64, "y", image_tokens=256)
    assert request_flops(FLUX, 999, "y", image_tokens=256) == request_flops(FLUX, 256, "y", image_tokens=256)


def test_unet_flops_are_the_unet_count_with_every_branch():
    assert request_flops(UNET_SHAPE, 40) == 2 * unet_step_flops(SD2, 256, 77, 40)
    assert request_flops(UNET_SHAPE, 40, "o") == request_flops(UNET_SHAPE, 40, "y")  # a UNet has one mode
    assert request_flops(UNET_SHAPE, 40, image_tokens=12 * 20) == 2 * unet_step_flops(SD2, 240, 77, 40)
    assert request_flops(UNET_SHAPE, 256) == 2 * unet_step_flops(SD2, 256, 77)  # a full mask is a stock step
    assert request_cached_flops(UNET_SHAPE, 40, "kv", "split") == 0.0
    cost = FittedCostModel(Profile(model_id="sd2", device_kind="cpu", compute_a=1e-9, compute_b=0.0, compute_r2=1,
                                   store_to_host=Transfer(1e9, 0.0), compute_d=5e-9, kv_attention="split"))
    assert cost.request_flops(UNET_SHAPE, 40) == request_flops(UNET_SHAPE, 40)  # no cached-key surcharge
    # a UNet worker whose shape the count does not model: no FLOPs, its steps cost b and c only
    assert request_flops(dataclasses.replace(UNET_SHAPE, unet=None), 40) == 0.0


def test_the_announced_unet_shape_and_its_json_form_round_trip():
    info = wpb.ModelInfo(model_id="sd2", image_tokens=256, text_tokens=77, in_channels=9, out_channels=4, branches=2,
                         family=UNET, unet=wpb.UNetShape(
                             channels=SD2.channels, layers=SD2.layers, down_attention=SD2.down_attention,
                             up_attention=SD2.up_attention, transformer_layers=SD2.transformer_layers,
                             mid_attention=True, cross_attention_dim=32, time_embed_dim=128))
    assert ModelShape.from_proto(info) == UNET_SHAPE
    # a profile keeps the shape as JSON: lists, a nested dict
    assert ModelShape(**dataclasses.asdict(UNET_SHAPE)) == UNET_SHAPE
    assert hash(ModelShape(**dataclasses.asdict(UNET_SHAPE))) == hash(UNET_SHAPE)
    # a worker of before families announces none: Flux
    old = ModelShape.from_proto(wpb.ModelInfo(model_id="f", image_tokens=64, hidden=32, in_channels=64))
    assert old.family == "flux" and old.unet is None and not old.is_unet


COST = AnalyticalCostModel(flops_per_second=1e9, step_overhead_seconds=0.01)


def view(shape: ModelShape, running=(), waiting=()) -> WorkerView:
    return WorkerView("w", shape, max_batch_size=4, running=list(running), waiting=list(waiting))


@pytest.mark.parametrize("shape", [FLUX, UNET_SHAPE], ids=["flux", "unet"])
def test_placement_counts_the_new_request_at_its_templates_size(shape):
    big = 4 * shape.image_tokens
    for finish in (predict_finish, lambda v, r, c: simulate_finish(v, r, c) + c.post_seconds):
        default = finish(view(shape), PlacementRequest(shape.model_id, "t", 20, 4), COST)
        sized = finish(view(shape), PlacementRequest(shape.model_id, "t", 20, 4, image_tokens=big), COST)
        # an idle worker: 4 steps of (FLOPs / rate + overhead)
        assert default == pytest.approx(4 * (COST.request_flops(shape, 20) / 1e9 + 0.01))
        assert sized == pytest.approx(4 * (COST.request_flops(shape, 20, image_tokens=big) / 1e9 + 0.01))
        assert sized > default


@pytest.mark.parametrize("shape", [FLUX, UNET_SHAPE], ids=["flux", "unet"])
def test_the_timeline_counts_running_work_at_its_templates_size(shape):
    big = 4 * shape.image_tokens
    new = PlacementRequest(shape.model_id, "t", 20, 2)
    small_batch = view(shape, running=[Work(20, 3)])
    big_batch = view(shape, running=[Work(20, 3, image_tokens=big)])
    f_new, f_small = COST.request_flops(shape, 20), COST.request_flops(shape, 20, image_tokens=big)
    for finish in (predict_finish, simulate_finish):
        # both run together for the new request's 2 steps
        assert finish(small_batch, new, COST) == pytest.approx(2 * ((f_new + f_new) / 1e9 + 0.01))
        assert finish(big_batch, new, COST) == pytest.approx(2 * ((f_new + f_small) / 1e9 + 0.01))


def test_step_seconds_takes_each_requests_size():
    one = COST.step_seconds(FLUX, [20, 20])
    assert one == pytest.approx(COST.step_time(2 * request_flops(FLUX, 20), 2))
    sized = COST.step_seconds(FLUX, [20, 20], image_tokens=[256, 0])
    assert sized == pytest.approx(COST.step_time(request_flops(FLUX, 20, image_tokens=256) + request_flops(FLUX, 20), 2))
