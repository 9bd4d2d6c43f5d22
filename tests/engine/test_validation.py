"""Bad input at the engine boundary, table-driven: every case raises its exact typed error naming the field.

Edits go through a running EngineLoop (construction, submit or pre-processing refuses them); registrations
through Editor.register_template. Nothing is coerced: 4.0 steps, a float seed, 1 for a flag, a float image
in [0, 1] all fail. After every case the same loop still serves a good request exactly.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from instgenie.engine import errors as E
from instgenie.engine.editor import Editor
from instgenie.engine.request import EditRequest
from instgenie.engine.serving.loop import EngineLoop
from instgenie.engine.template_cache import DirectoryBlobStore, TemplateStore
from tests.engine.helpers import masks_for, random_image
from tests.engine.test_images import bomb_png

RES = (128, 128)  # flux-tiny
WAIT = 60
GOOD_MASK = masks_for(RES)["disc"]


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


_PNG = _png(random_image(RES, 3))
_BOMB = bomb_png(5000, 5000)  # 25 M pixels declared, over the default 16.7 M
_TRANSPARENT = np.zeros((*RES, 4), np.uint8)


@dataclass
class Case:
    overrides: dict
    error: type
    field: str
    match: str


def case(name, error, field, match, **overrides):
    return pytest.param(Case(overrides, error, field, match), id=name)


EDIT_CASES = [
    # steps: integers in [1, 200] equal to the template's (4), nothing else
    case("steps-0", E.InvalidStepsError, "steps", r"within \[1, 200\]", steps=0),
    case("steps-negative", E.InvalidStepsError, "steps", r"within \[1, 200\]", steps=-1),
    case("steps-201", E.InvalidStepsError, "steps", r"within \[1, 200\]", steps=201),
    case("steps-huge", E.InvalidStepsError, "steps", r"within \[1, 200\]", steps=10 ** 30),
    case("steps-fraction", E.InvalidStepsError, "steps", "must be an integer", steps=2.5),
    case("steps-integral-float", E.InvalidStepsError, "steps", "must be an integer", steps=4.0),
    case("steps-numpy-float", E.InvalidStepsError, "steps", "must be an integer", steps=np.float64(4)),
    case("steps-string", E.InvalidStepsError, "steps", "must be an integer", steps="4"),
    case("steps-bool", E.InvalidStepsError, "steps", "must be an integer", steps=True),
    case("steps-list", E.InvalidStepsError, "steps", "must be an integer", steps=[4]),
    case("steps-not-the-templates", E.InvalidStepsError, "steps", "registered with 4 steps", steps=3),
    # seed: integers in [0, 2**64 - 1]
    case("seed-negative", E.InvalidSeedError, "seed", r"within \[0, 2\*\*64 - 1\]", seed=-1),
    case("seed-2**64", E.InvalidSeedError, "seed", r"within \[0, 2\*\*64 - 1\]", seed=2 ** 64),
    case("seed-fraction", E.InvalidSeedError, "seed", "must be an integer", seed=1.5),
    case("seed-integral-float", E.InvalidSeedError, "seed", "must be an integer", seed=1.0),
    case("seed-numpy-float", E.InvalidSeedError, "seed", "must be an integer", seed=np.float32(3)),
    case("seed-string", E.InvalidSeedError, "seed", "must be an integer", seed="1"),
    case("seed-bool", E.InvalidSeedError, "seed", "must be an integer", seed=True),
    case("seed-none", E.InvalidSeedError, "seed", "must be an integer", seed=None),
    case("seed-nan", E.InvalidSeedError, "seed", "must be an integer", seed=float("nan")),
    # guidance_scale: a finite real in [0, 50]
    case("guidance-nan", E.InvalidGuidanceError, "guidance_scale", r"within \[0, 50\]", guidance_scale=float("nan")),
    case("guidance-inf", E.InvalidGuidanceError, "guidance_scale", r"within \[0, 50\]", guidance_scale=float("inf")),
    case("guidance-neg-inf", E.InvalidGuidanceError, "guidance_scale", r"within \[0, 50\]", guidance_scale=-float("inf")),
    case("guidance-negative", E.InvalidGuidanceError, "guidance_scale", r"within \[0, 50\]", guidance_scale=-0.1),
    case("guidance-above", E.InvalidGuidanceError, "guidance_scale", r"within \[0, 50\]", guidance_scale=50.1),
    case("guidance-string", E.InvalidGuidanceError, "guidance_scale", "must be a number", guidance_scale="3.5"),
    case("guidance-bool", E.InvalidGuidanceError, "guidance_scale", "must be a number", guidance_scale=True),
    case("guidance-complex", E.InvalidGuidanceError, "guidance_scale", "must be a number", guidance_scale=1 + 1j),
    case("guidance-list", E.InvalidGuidanceError, "guidance_scale", "must be a number", guidance_scale=[1.0]),
    # dilate: an integer in [0, 8]
    case("dilate-negative", E.InvalidDilateError, "dilate", r"within \[0, 8\]", dilate=-1),
    case("dilate-9", E.InvalidDilateError, "dilate", r"within \[0, 8\]", dilate=9),
    case("dilate-fraction", E.InvalidDilateError, "dilate", r"within \[0, 8\]", dilate=1.5),
    case("dilate-integral-float", E.InvalidDilateError, "dilate", r"within \[0, 8\]", dilate=1.0),
    case("dilate-string", E.InvalidDilateError, "dilate", r"within \[0, 8\]", dilate="1"),
    case("dilate-bool", E.InvalidDilateError, "dilate", r"within \[0, 8\]", dilate=True),
    case("dilate-none", E.InvalidDilateError, "dilate", r"within \[0, 8\]", dilate=None),
    # template_id: [A-Za-z0-9][A-Za-z0-9._-]{0,127}, checked before it becomes a store key
    case("template-empty", E.InvalidTemplateIdError, "template_id", "is empty", template_id=""),
    case("template-traversal", E.InvalidTemplateIdError, "template_id", "must start with", template_id="../etc"),
    case("template-slash", E.InvalidTemplateIdError, "template_id", "only letters", template_id="a/b"),
    case("template-too-long", E.InvalidTemplateIdError, "template_id", "at most 128", template_id="a" * 129),
    case("template-hidden", E.InvalidTemplateIdError, "template_id", "must start with", template_id=".hidden"),
    case("template-dash-first", E.InvalidTemplateIdError, "template_id", "must start with", template_id="-x"),
    case("template-int", E.InvalidTemplateIdError, "template_id", "must be a string", template_id=123),
    case("template-none", E.InvalidTemplateIdError, "template_id", "must be a string", template_id=None),
    case("template-nul", E.InvalidTemplateIdError, "template_id", "only letters", template_id="tpl\x00"),
    case("template-space", E.InvalidTemplateIdError, "template_id", "only letters", template_id="tpl id"),
    case("template-non-ascii", E.InvalidTemplateIdError, "template_id", "only letters", template_id="t\u00ebmplate"),
    case("template-newline", E.InvalidTemplateIdError, "template_id", "only letters", template_id="tpl\n"),
    case("template-unknown", E.TemplateNotFoundError, "template_id", "register it first", template_id="tpl-missing"),
    # prompt: text the model can encode
    case("prompt-none", E.InvalidPromptError, "prompt", "must be a string", prompt=None),
    case("prompt-bytes", E.InvalidPromptError, "prompt", "must be a string", prompt=b"x"),
    case("prompt-int", E.InvalidPromptError, "prompt", "must be a string", prompt=123),
    case("prompt-too-long", E.InvalidPromptError, "prompt", "at most 2000", prompt="x" * 5000),
    case("prompt-lone-surrogate", E.InvalidPromptError, "prompt", "not valid Unicode", prompt="a\ud800"),
    case("prompt-nul", E.InvalidPromptError, "prompt", "NUL", prompt="a\x00b"),
    # path and flags
    case("path-unknown", E.InvalidInputError, "path", "must be one of", path="fast"),
    case("path-none", E.InvalidInputError, "path", "must be one of", path=None),
    case("path-case", E.InvalidInputError, "path", "must be one of", path="SPARSE"),
    case("paste-back-string", E.InvalidInputError, "paste_back", "must be a bool", paste_back="yes"),
    case("paste-back-int", E.InvalidInputError, "paste_back", "must be a bool", paste_back=1),
    case("fallback-int", E.InvalidInputError, "fallback_to_full", "must be a bool", fallback_to_full=0),
    case("allow-empty-string", E.InvalidInputError, "allow_empty_mask", "must be a bool", allow_empty_mask="no"),
    case("deadline-string", E.InvalidInputError, "deadline", "finite", deadline="soon"),
    case("deadline-nan", E.InvalidInputError, "deadline", "finite", deadline=float("nan")),
    case("deadline-inf", E.InvalidInputError, "deadline", "finite", deadline=float("inf")),
    # request_id: the id charset too
    case("request-empty", E.InvalidRequestIdError, "request_id", "is empty", request_id=""),
    case("request-space", E.InvalidRequestIdError, "request_id", "only letters", request_id="a b"),
    case("request-too-long", E.InvalidRequestIdError, "request_id", "at most 128", request_id="x" * 200),
    case("request-int", E.InvalidRequestIdError, "request_id", "must be a string", request_id=5),
    case("request-traversal", E.InvalidRequestIdError, "request_id", "must start with", request_id="../x"),
    # mask: type, size, value range and channels; an error is never read as an empty mask
    case("mask-none", E.InvalidMaskError, "mask", "must be a PIL image", mask=None),
    case("mask-path-string", E.InvalidMaskError, "mask", "must be a PIL image", mask="mask.png"),
    case("mask-list", E.InvalidMaskError, "mask", "must be a PIL image", mask=[[1, 0], [0, 1]]),
    case("mask-wrong-size", E.InvalidMaskError, "mask", "template's size", mask=np.ones((10, 10))),
    case("mask-4d", E.InvalidMaskError, "mask", "must be 2-D", mask=np.ones((1, 2, *RES))),
    case("mask-all-black", E.EmptyMaskError, "mask", "selects no pixel", mask=np.zeros(RES)),
    case("mask-nan", E.InvalidMaskError, "mask", "NaN", mask=np.full(RES, np.nan)),
    case("mask-float-0-255", E.InvalidMaskError, "mask", r"\[0, 1\]", mask=GOOD_MASK * 255.0),
    case("mask-float-negative", E.InvalidMaskError, "mask", r"\[0, 1\]", mask=GOOD_MASK - 0.5),
    case("mask-int-256", E.InvalidMaskError, "mask", r"0\.\.255", mask=GOOD_MASK.astype(np.int64) * 256),
    case("mask-int-negative", E.InvalidMaskError, "mask", r"0\.\.255", mask=-GOOD_MASK.astype(np.int64)),
    case("mask-int-0-1", E.EmptyMaskError, "mask", "0/1", mask=GOOD_MASK.astype(np.uint8)),
    case("mask-bool-wrong-size", E.InvalidMaskError, "mask", "template's size", mask=np.ones((64, 128), bool)),
    case("mask-pil-float-0-255", E.InvalidMaskError, "mask", r"\[0, 1\]",
         mask=Image.fromarray((GOOD_MASK * 255).astype(np.float32))),
    case("mask-pil-int-1000", E.InvalidMaskError, "mask", r"0\.\.255",
         mask=Image.fromarray((GOOD_MASK * 1000).astype(np.int32))),
    case("mask-5-channels", E.InvalidMaskError, "mask", "channels", mask=np.zeros((*RES, 5), np.uint8)),
    case("mask-garbage-bytes", E.InvalidMaskError, "mask", "not a readable image", mask=b"garbage"),
    case("mask-truncated-png", E.InvalidMaskError, "mask", "truncated|cannot", mask=_PNG[: len(_PNG) // 2]),
    case("mask-transparent", E.EmptyMaskError, "mask", "selects no pixel", mask=Image.fromarray(_TRANSPARENT)),
    case("mask-tensor-nan", E.InvalidMaskError, "mask", "NaN", mask=torch.full(RES, float("nan"))),
    case("mask-tensor-complex", E.InvalidMaskError, "mask", "dtype", mask=torch.ones(RES, dtype=torch.complex64)),
    case("mask-bomb", E.ImageTooLargeError, "mask", "5000x5000", mask=_BOMB),
]

REGISTER_CASES = [
    case("image-none", E.InvalidImageError, "image", "must be encoded image bytes", image=None),
    case("image-path-string", E.InvalidImageError, "image", "must be encoded image bytes", image="x.png"),
    case("image-wrong-size", E.InvalidImageError, "image", "resize", image=np.zeros((10, 10, 3), np.uint8)),
    case("image-float-0-1", E.InvalidImageError, "image", "cannot be told apart", image=random_image(RES) / 255.0),
    case("image-float-0-255", E.InvalidImageError, "image", "cannot be told apart",
         image=random_image(RES).astype(np.float32)),
    case("image-int-above-255", E.InvalidImageError, "image", r"0\.\.255", image=random_image(RES).astype(int) + 256),
    case("image-5-channels", E.InvalidImageError, "image", "1-4 channels", image=np.zeros((*RES, 5), np.uint8)),
    case("image-tensor-nan", E.InvalidImageError, "image", "NaN", image=torch.full((1, 3, *RES), float("nan"))),
    case("image-tensor-range", E.InvalidImageError, "image", r"\[-1, 1\]", image=torch.full((1, 3, *RES), 2.0)),
    case("image-tensor-channels", E.InvalidImageError, "image", "C = 3", image=torch.zeros((1, 2, *RES))),
    case("image-tensor-int", E.InvalidImageError, "image", "floating point", image=torch.zeros((1, 3, *RES), dtype=torch.uint8)),
    case("image-garbage-bytes", E.InvalidImageError, "image", "not a readable image", image=b"garbage"),
    case("image-truncated-png", E.InvalidImageError, "image", "truncated|cannot", image=_PNG[: len(_PNG) // 2]),
    case("image-empty-bytes", E.InvalidImageError, "image", "empty", image=b""),
    case("image-bomb", E.ImageTooLargeError, "image", "5000x5000", image=_BOMB),
    case("image-pil-float", E.InvalidImageError, "image", "mode 'F'", image=Image.fromarray(np.zeros(RES, np.float32))),
    case("mode-unknown", E.InvalidInputError, "cache_mode", "cache mode must be one of", mode="z"),
    case("register-steps-0", E.InvalidStepsError, "steps", r"within \[1, 200\]", steps=0),
    case("register-steps-fraction", E.InvalidStepsError, "steps", "must be an integer", steps=2.5),
    case("register-steps-string", E.InvalidStepsError, "steps", "must be an integer", steps="4"),
    case("register-seed-negative", E.InvalidSeedError, "seed", "within", seed=-1),
    case("register-seed-float", E.InvalidSeedError, "seed", "must be an integer", seed=0.5),
    case("register-id-traversal", E.InvalidTemplateIdError, "template_id", "must start with", template_id="../x"),
    case("register-id-empty", E.InvalidTemplateIdError, "template_id", "is empty", template_id=""),
    case("register-guidance-nan", E.InvalidGuidanceError, "guidance_scale", "within", guidance_scale=float("nan")),
    case("register-progress", E.InvalidInputError, "progress", "must be callable", progress=5),
    case("register-prompt-none", E.InvalidPromptError, "prompt", "must be a string", prompt=None),
    case("register-prompt-long", E.InvalidPromptError, "prompt", "at most 2000", prompt="x" * 5000),
    case("register-id-taken", E.TemplateExistsError, "template_id", "already registered with other inputs",
         template_id="served", seed=99),
]


@pytest.fixture(scope="module")
def serving(tiny_model, tmp_path_factory):
    assert tuple(tiny_model.info.resolution) == RES
    editor = Editor(tiny_model, TemplateStore(DirectoryBlobStore(tmp_path_factory.mktemp("validation"))))
    manifest = editor.register_template(random_image(RES, 1), "t", steps=4, seed=1, template_id="served")
    loop = EngineLoop(editor, pre_workers=2)
    yield editor, loop, manifest.template_id
    loop.stop(drain=False)


def _check(err, c: Case) -> None:
    assert type(err) is c.error, f"{type(err).__name__}: {err}"
    assert err.field == c.field and err.code == c.error.code
    assert re.search(c.match, str(err)), str(err)


def test_there_are_enough_cases_across_every_field():
    fields = {p.values[0].field for p in EDIT_CASES + REGISTER_CASES}
    assert len(EDIT_CASES) + len(REGISTER_CASES) >= 60
    assert {"image", "mask", "prompt", "steps", "seed", "guidance_scale", "dilate", "template_id", "request_id",
            "path", "deadline", "cache_mode"} <= fields


@pytest.mark.parametrize("c", EDIT_CASES)
def test_bad_edit_input_is_refused_at_the_boundary(serving, c):
    editor, loop, template_id = serving
    fields = dict(template_id=template_id, mask=GOOD_MASK, prompt="x", seed=1) | c.overrides
    with pytest.raises(E.InstGenIEError) as err:
        handle = loop.submit(EditRequest(**fields))  # scalar fields fail here, synchronously
        handle.result(WAIT)  # mask and template problems fail in pre-processing
    _check(err.value, c)


@pytest.mark.parametrize("name,value,error", [
    ("steps", 4.0, E.InvalidStepsError), ("seed", 1.0, E.InvalidSeedError), ("template_id", "../x", E.InvalidTemplateIdError),
])
def test_fields_reassigned_after_construction_are_checked_again(serving, name, value, error):
    editor, loop, template_id = serving
    request = EditRequest(template_id, GOOD_MASK, "x")
    setattr(request, name, value)
    with pytest.raises(error):
        loop.submit(request)
    with pytest.raises(error):
        editor.start(request)


@pytest.mark.parametrize("c", REGISTER_CASES)
def test_bad_registration_input_is_refused_before_anything_is_written(serving, c):
    editor, _, _ = serving
    before = editor.store.list()
    fields = dict(image=random_image(RES, 5), prompt="p", steps=2, seed=0) | c.overrides
    image = fields.pop("image")
    with pytest.raises(E.InstGenIEError) as err:
        editor.register_template(image, **fields)
    _check(err.value, c)
    assert editor.store.list() == before


def test_the_loop_keeps_serving_after_every_bad_input(serving):
    editor, loop, template_id = serving
    alone = editor.edit(template_id, GOOD_MASK, "x", seed=1)
    got = loop.submit(EditRequest(template_id, GOOD_MASK, "x", seed=1)).result(WAIT)
    assert (got.latents - alone.latents).abs().max().item() == 0
    assert loop.in_flight() == 0 and not loop.scheduler.entries
