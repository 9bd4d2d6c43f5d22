"""Bad input over the public API, table-driven: each case gets its precise status, a message a user can act on
and (for INVALID_ARGUMENT) the field at fault; afterwards every service still serves, with the same process."""
from __future__ import annotations

import io
import struct
import zlib

import grpc
import numpy as np
import pytest
from PIL import Image

from instgenie.gateway.v1 import edit_service_pb2 as pb
from instgenie.status import parse_rpc_error

from .mesh_helpers import auth, channel, create_template, digit, half_mask, health, png, stub

C = grpc.StatusCode
NO_KEY = ()
BAD_KEY = (("authorization", "Bearer not-a-real-key-123"),)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A few hundred bytes declaring a 10-gigapixel canvas (it would need 10 GB to decode)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


def encoded(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    img.save(buf, format=fmt)
    return buf.getvalue()


MASK = png(half_mask())
GOOD = dict(mask=MASK, prompt="8")
rng = np.random.default_rng(0)
GREY = png((rng.random((16, 16)) * 255).astype(np.uint8))
TRANSPARENT = png(np.zeros((16, 16, 4), dtype=np.uint8), "RGBA")
FLOAT_0_255 = encoded((half_mask().astype(np.float32)), "TIFF")  # 'F' mode with values 0..255
LAB = encoded(np.stack([half_mask()] * 3, -1), "TIFF", "LAB")


def edit(template="{tpl}", **fields):
    return ("Edit", lambda ids: pb.EditRequest(template_id=template.format(**ids), **{**GOOD, **fields}))


def create(**fields):
    return ("CreateTemplate", lambda ids: pb.CreateTemplateRequest(**{"image": png(digit(4)), "prompt": "4", **fields}))


CASES = [
    # --- CreateTemplate: images
    ("image not an image", create(image=b"this is not a png"), C.INVALID_ARGUMENT, "image", "readable image"),
    ("image truncated", create(image=png(digit(4))[:60]), C.INVALID_ARGUMENT, "image", "truncated"),
    ("image bomb", create(image=bomb_png()), C.INVALID_ARGUMENT, "image", "pixels"),
    ("image empty", create(image=b""), C.INVALID_ARGUMENT, "image", "empty"),
    ("image of a size no model serves", create(image=png(np.zeros((17, 17), np.uint8))), C.INVALID_ARGUMENT,
     "image", "no model serves"),
    ("image over the byte limit", create(image=b"\x89PNG" + bytes(21 << 20)), C.INVALID_ARGUMENT, "image",
     "bytes"),
    ("create prompt huge", create(prompt="3" * 100_000), C.INVALID_ARGUMENT, "prompt", "at most"),
    ("create prompt with NUL", create(prompt="3\x00"), C.INVALID_ARGUMENT, "prompt", "control"),
    ("create steps absurd", create(steps=100_000), C.INVALID_ARGUMENT, "steps", "within"),
    ("create steps negative", create(steps=-3), C.INVALID_ARGUMENT, "steps", "within"),
    ("create guidance NaN", create(guidance_scale=float("nan")), C.INVALID_ARGUMENT, "guidance_scale", "finite"),
    ("create seed negative", create(seed=-1), C.INVALID_ARGUMENT, "seed", "within"),
    ("create bad request id", create(request_id="has space"), C.INVALID_ARGUMENT, "request_id", "letters"),
    ("create unknown model", create(model="sdxl"), C.INVALID_ARGUMENT, "model", "not served"),
    ("create unknown cache mode", create(cache_mode=7), C.INVALID_ARGUMENT, "cache_mode", "cache_mode"),
    ("create name with NUL", create(name="a\x00b"), C.INVALID_ARGUMENT, "name", "control"),
    # --- Edit: templates
    ("edit unknown template", edit("tpl-00000000000000000000"), C.NOT_FOUND, "template_id", "not found"),
    ("edit malformed template id", edit("../../etc/passwd"), C.INVALID_ARGUMENT, "template_id", "not a template id"),
    ("edit foreign template", edit("{beta}"), C.NOT_FOUND, "template_id", "not found"),
    ("edit template still creating", edit("{creating}"), C.FAILED_PRECONDITION, None, "still being created"),
    # --- Edit: masks
    ("mask of the wrong size", edit(mask=png(np.full((32, 32), 255, np.uint8))), C.INVALID_ARGUMENT, "mask",
     "template's size"),
    ("mask empty (all black)", edit(mask=png(np.zeros((16, 16), np.uint8))), C.INVALID_ARGUMENT, "mask",
     "no pixel"),
    ("mask fully transparent", edit(mask=TRANSPARENT), C.INVALID_ARGUMENT, "mask", "no pixel"),
    ("mask not black and white", edit(mask=GREY), C.INVALID_ARGUMENT, "mask", "grey"),
    ("mask float mode out of range", edit(mask=FLOAT_0_255), C.INVALID_ARGUMENT, "mask", "[0, 1]"),
    ("mask of a colour space no mask uses", edit(mask=LAB), C.INVALID_ARGUMENT, "mask", "not a mask mode"),
    ("mask not an image", edit(mask=b"GIF89a nonsense"), C.INVALID_ARGUMENT, "mask", "readable image"),
    ("mask bytes missing", edit(mask=b""), C.INVALID_ARGUMENT, "mask", "empty"),
    ("mask truncated", edit(mask=MASK[:50]), C.INVALID_ARGUMENT, "mask", "truncated"),
    ("mask bomb", edit(mask=bomb_png()), C.INVALID_ARGUMENT, "mask", "pixels"),
    ("mask over the byte limit", edit(mask=bytes(21 << 20)), C.INVALID_ARGUMENT, "mask", "bytes"),
    # --- Edit: scalars
    ("edit steps other than the template's", edit(steps=7), C.INVALID_ARGUMENT, "steps", "20 steps"),
    ("edit steps absurd", edit(steps=2 ** 31 - 1), C.INVALID_ARGUMENT, "steps", "20 steps"),
    ("edit guidance NaN", edit(guidance_scale=float("nan")), C.INVALID_ARGUMENT, "guidance_scale", "finite"),
    ("edit guidance huge", edit(guidance_scale=1e9), C.INVALID_ARGUMENT, "guidance_scale", "within"),
    ("edit seed negative", edit(seed=-5), C.INVALID_ARGUMENT, "seed", "within"),
    ("edit dilate absurd", edit(dilate=1000), C.INVALID_ARGUMENT, "dilate", "within"),
    ("edit prompt huge", edit(prompt="x" * 50_000), C.INVALID_ARGUMENT, "prompt", "at most"),
    ("edit prompt with NUL", edit(prompt="8\x00; rm -rf /"), C.INVALID_ARGUMENT, "prompt", "control"),
    ("edit prompt the model cannot encode", edit(prompt="a cat"), C.INVALID_ARGUMENT, "prompt", "single digit"),
    ("edit request id too long", edit(request_id="r" * 200), C.INVALID_ARGUMENT, "request_id", "1-128"),
    ("edit request id reused for other input", edit(request_id="dup-1", seed=2), C.ALREADY_EXISTS, "request_id",
     "already used"),
    # --- auth
    ("no API key", ("Edit", lambda ids: pb.EditRequest(template_id=ids["tpl"], **GOOD)), C.UNAUTHENTICATED, None,
     "missing API key", NO_KEY),
    ("unknown API key", ("ListTemplates", lambda ids: pb.ListTemplatesRequest()), C.UNAUTHENTICATED, None,
     "unknown API key", BAD_KEY),
    # --- the other calls
    ("bad page token", ("ListTemplates", lambda ids: pb.ListTemplatesRequest(page_token="bm9wZQ==")),
     C.INVALID_ARGUMENT, "page_token", "next_page_token"),
    ("page size absurd", ("ListTemplates", lambda ids: pb.ListTemplatesRequest(page_size=10 ** 6)),
     C.INVALID_ARGUMENT, "page_size", "within"),
    ("operation name malformed", ("GetOperation", lambda ids: pb.GetOperationRequest(name="ops/1")),
     C.INVALID_ARGUMENT, "name", "not one of ours"),
    ("operation unknown", ("GetOperation", lambda ids: pb.GetOperationRequest(
        name="operations/tpl-00000000000000000000")), C.NOT_FOUND, "template_id", "not found"),
    ("cancel of an unknown edit", ("CancelEdit", lambda ids: pb.CancelEditRequest(request_id="never-sent")),
     C.NOT_FOUND, "request_id", "no edit"),
    ("cancel without request id", ("CancelEdit", lambda ids: pb.CancelEditRequest()), C.INVALID_ARGUMENT,
     "request_id", "required"),
    ("delete while creating", ("DeleteTemplate", lambda ids: pb.DeleteTemplateRequest(template_id=ids["creating"])),
     C.FAILED_PRECONDITION, None, "still being created"),
    ("get template malformed id", ("GetTemplate", lambda ids: pb.GetTemplateRequest(template_id="TPL-1")),
     C.INVALID_ARGUMENT, "template_id", "not a template id"),
]


@pytest.fixture(scope="module")
def setup(mesh):
    with channel(mesh) as ch:
        s = stub(ch)
        ids = {"tpl": create_template(s, "alpha", digit(3)), "beta": create_template(s, "beta", digit(2), prompt="2")}
        s.Edit(pb.EditRequest(template_id=ids["tpl"], request_id="dup-1", seed=1, **GOOD), metadata=auth(), timeout=60)
        # A 200-step registration stays CREATING for the seconds the table takes.
        op = s.CreateTemplate(pb.CreateTemplateRequest(image=png(digit(9)), prompt="9", steps=200), metadata=auth(),
                              timeout=30).operation
        ids["creating"] = op.name.removeprefix("operations/")
        pids = {p.name: p.pid for p in mesh.processes()}
        yield s, ids, pids
        s.WaitOperation(pb.WaitOperationRequest(name=op.name), metadata=auth(), timeout=120)


def test_the_table_is_big_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(setup, case):
    s, ids, _ = setup
    name, (method, build), code, field, words, *md = case
    metadata = md[0] if md else auth()
    with pytest.raises(grpc.RpcError) as err:
        getattr(s, method)(build(ids), metadata=metadata, timeout=30)
    info = parse_rpc_error(err.value)
    assert info.code == code, f"{name}: {info.code.name}: {info.message}"
    assert words.lower() in info.message.lower(), f"{name}: {info.message!r} does not mention {words!r}"
    assert info.reason, f"{name}: no ErrorInfo reason"
    if field is not None:
        assert field in [v.field for v in info.violations], f"{name}: violations {info.violations}"


def test_past_deadline_is_deadline_exceeded(setup):
    s, ids, _ = setup
    with pytest.raises(grpc.RpcError) as err:
        s.Edit(pb.EditRequest(template_id=ids["tpl"], **GOOD), metadata=auth(), timeout=0.0001)
    assert err.value.code() == C.DEADLINE_EXCEEDED


def test_every_service_still_serving_with_the_same_process(setup, mesh):
    s, ids, pids = setup
    for p in mesh.processes():
        assert p.alive(), f"{p.name} died:\n{p.log_tail()}"
        assert p.pid == pids[p.name]
        assert health(p.address) == "SERVING", p.name
    # And a good request still works.
    result = s.Edit(pb.EditRequest(template_id=ids["tpl"], seed=4, **GOOD), metadata=auth(), timeout=60).result
    assert result.image
