"""The scheduler prices an edit at its template's size (EditRequest.image_tokens) and a UNet worker's edits with
the UNet FLOP count: the placement's prediction, the FLOPs it tracks, and the validation of the token counts."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from instgenie.scheduler.v1 import scheduler_service_pb2 as spb
from instgenie.services.scheduler.costmodel import UNET, FittedCostModel, ModelShape
from instgenie.worker.v1 import worker_service_pb2 as wpb

from . import test_service as ts

A, B = 1e-9, 0.002  # seconds per FLOP, per step: FLOPs weigh in the prediction


def fitted():
    return ts.profile(compute_a=A, compute_b=B)


def sized(i: int, image_tokens: int, masked: int = 8, steps: int = 4) -> spb.EditRequest:
    r = ts.edit_request(i, steps=steps)
    r.masked_tokens, r.image_tokens = masked, image_tokens
    return r


async def first(stub, request):
    """The placement message, and the rest of the stream once it ends."""
    call = stub.Edit(request)
    events = [m async for m in call]
    return events[0].placement, events


def predicted(model: wpb.ModelInfo, masked: int, image_tokens: int = 0, steps: int = 4) -> float:
    cost = FittedCostModel(fitted())
    return steps * (A * cost.request_flops(ModelShape.from_proto(model), masked, "kv", image_tokens) + B)


def test_an_edit_is_predicted_and_tracked_at_its_templates_size():
    async def main():
        # no online speed correction: the fake worker's steps are slower than this profile says
        async with ts.cluster({"w": ts.FakeWorker()}, [fitted()], correction=False) as (service, stub, _):
            default, _ = await first(stub, sized(1, 0))
            assert default.predicted_seconds == pytest.approx(predicted(ts.MODEL, 8))
            # a template 4x the model's default size: the same mask costs more
            big = 4 * ts.MODEL.image_tokens
            call = stub.Edit(sized(2, big))
            placement = (await call.read()).placement
            tracked = service.registry.get("w").tracked["r2"]
            assert tracked.image_tokens == big
            assert tracked.flops == FittedCostModel(fitted()).request_flops(
                ModelShape.from_proto(ts.MODEL), 8, "kv", big)
            assert placement.predicted_seconds == pytest.approx(predicted(ts.MODEL, 8, big))
            assert placement.predicted_seconds > default.predicted_seconds
            while await call.read() is not grpc.aio.EOF:  # let it finish
                pass

    asyncio.run(main())


def test_a_unet_worker_is_predicted_with_the_unet_count(monkeypatch):
    unet = wpb.ModelInfo(model_id="m", image_tokens=256, text_tokens=77, in_channels=9, out_channels=4, branches=2,
                         default_steps=4, family=UNET, cache_modes=["o"], cell=32, unet=wpb.UNetShape(
                             channels=[32, 64, 64], layers=[1, 1, 1], down_attention=[True, True, False],
                             up_attention=[True, True, False], transformer_layers=[1, 1, 1], mid_attention=True,
                             cross_attention_dim=32, time_embed_dim=128))
    monkeypatch.setattr(ts, "MODEL", unet)

    async def main():
        async with ts.cluster({"w": ts.FakeWorker()}, [fitted()]) as (service, stub, _):
            shape = service.registry.get("w").shape
            assert shape.is_unet and shape.unet.channels == (32, 64, 64)
            request = sized(1, 12 * 20, masked=40)  # a 96x160 template: 12 x 20 latent cells
            request.cache_mode = "o"
            placement, _ = await first(stub, request)
            want = predicted(unet, 40, 240)
            assert placement.predicted_seconds == pytest.approx(want)
            # the UNet count, not the transformer's (which is 0 for a shape with no blocks)
            assert want > 4 * B * 1.5

    asyncio.run(main())


@pytest.mark.parametrize("fields, field", [
    (dict(image_tokens=-1), "image_tokens"),
    (dict(masked_tokens=-3), "masked_tokens"),
    (dict(masked_tokens=65, image_tokens=64), "masked_tokens"),
])
def test_bad_token_counts_are_invalid_argument(fields, field):
    async def main():
        async with ts.cluster({"w": ts.FakeWorker()}, [fitted()]) as (service, stub, _):
            request = ts.edit_request(1)
            for k, v in fields.items():
                setattr(request, k, v)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [m async for m in stub.Edit(request)]
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
            reg = spb.RegisterTemplateRequest(registration=wpb.RegisterTemplateRequest(template_id="t"), model="m",
                                              image_tokens=-1)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [m async for m in stub.RegisterTemplate(reg)]
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image_tokens" in err.value.details()
            # the default size and a template's own size are both fine
            assert (await first(stub, sized(2, 64, masked=64)))[0].worker_id == "w"

    asyncio.run(main())
