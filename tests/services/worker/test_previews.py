"""StreamEdit previews: every k steps a small PNG made off the denoising loop (the worker's codec pool), with
the template's pixels outside the mask, converging on the result; none unless asked for."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from instgenie.gateway.v1 import edit_service_pb2 as pb
from tests.services.mesh_helpers import auth, channel, create_template, decode, digit, half_mask, png, stub

pytestmark = pytest.mark.slow


def stream(s, template_id: str, **fields) -> list:
    request = pb.StreamEditRequest(edit=pb.EditRequest(template_id=template_id, mask=png(half_mask()), prompt="8",
                                                       seed=11, **fields))
    return list(s.StreamEdit(request, metadata=auth(), timeout=120))


def test_previews_every_k_steps_converge_on_the_result(mesh):
    with channel(mesh) as ch:
        s = stub(ch)
        template_id = create_template(s, image=digit(0, index=4), prompt="0")
        events = stream(s, template_id, preview_every_steps=4)
    progress = [e.progress for e in events if e.WhichOneof("event") == "progress"]
    assert [p.step for p in progress] == list(range(1, 21)), "previews add no events and drop none"
    with_preview = [p for p in progress if p.preview]
    # Every 4th step but the last, whose picture is the result itself.
    assert [p.step for p in with_preview] == [4, 8, 12, 16]
    assert all(p.preview_mime_type == "image/png" for p in with_preview)
    assert not any(p.preview_mime_type for p in progress if not p.preview)
    result = decode(events[-1].result.image).astype(int)
    keep = half_mask() == 0
    distances = []
    for p in with_preview:
        picture = decode(p.preview).astype(int)
        assert picture.shape == (16, 16)
        assert np.array_equal(picture[keep], digit(0, index=4)[keep]), "template pixels outside the mask"
        distances.append(np.abs(picture - result).mean())
    assert distances[-1] < distances[0], f"later previews are closer to the result: {distances}"


def test_no_previews_unless_asked(mesh):
    with channel(mesh) as ch:
        s = stub(ch)
        template_id = create_template(s, image=digit(0, index=4), prompt="0")
        events = stream(s, template_id)
        bad = pb.StreamEditRequest(edit=pb.EditRequest(template_id=template_id, mask=png(half_mask()), prompt="8",
                                                       preview_every_steps=-1))
        with pytest.raises(grpc.RpcError) as err:
            list(s.StreamEdit(bad, metadata=auth(), timeout=60))
    assert all(not e.progress.preview for e in events if e.WhichOneof("event") == "progress")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "preview_every_steps" in err.value.details()
