"""Bad input raises typed errors whose messages say what to change."""
from __future__ import annotations

import numpy as np
import pytest

from instgenie.engine.errors import (
    CacheMismatchError, EmptyMaskError, InvalidImageError, InvalidInputError, InvalidMaskError,
    InvalidStepsError, TemplateNotFoundError,
)
from tests.engine.helpers import random_image


@pytest.fixture()
def template(tiny_editor):
    return tiny_editor.register_template(random_image(tiny_editor.model.info.resolution), "p", steps=3)


def test_mask_of_wrong_size(tiny_editor, template):
    with pytest.raises(InvalidMaskError, match="template's size"):
        tiny_editor.edit(template.template_id, np.ones((10, 10)), "x")


def test_all_zero_mask(tiny_editor, template):
    res = tiny_editor.model.info.resolution
    with pytest.raises(EmptyMaskError):
        tiny_editor.edit(template.template_id, np.zeros(res), "x")


def test_unknown_template(tiny_editor):
    with pytest.raises(TemplateNotFoundError) as err:
        tiny_editor.edit("tpl-missing", np.ones((4, 4)), "x")
    assert err.value.grpc_code == "NOT_FOUND"


def test_steps_out_of_range_or_different_from_template(tiny_editor, template):
    res = tiny_editor.model.info.resolution
    with pytest.raises(InvalidStepsError, match="within"):
        tiny_editor.register_template(random_image(res), "p", steps=0)
    with pytest.raises(InvalidStepsError, match="within"):
        tiny_editor.register_template(random_image(res), "p", steps=10_000)
    with pytest.raises(InvalidStepsError, match="registered with 3 steps"):
        tiny_editor.edit(template.template_id, np.ones(res), "x", steps=5)


def test_other_bad_inputs(tiny_editor, template):
    res = tiny_editor.model.info.resolution
    with pytest.raises(InvalidImageError, match="resize"):
        tiny_editor.register_template(np.zeros((10, 10, 3), np.uint8), "p")
    with pytest.raises(InvalidInputError, match="cache mode"):
        tiny_editor.register_template(random_image(res), "p", mode="z")
    with pytest.raises(InvalidInputError, match="path"):
        tiny_editor.edit(template.template_id, np.ones(res), "x", path="fast")
    with pytest.raises(InvalidInputError, match="guidance_scale"):
        tiny_editor.edit(template.template_id, np.ones(res), "x", guidance_scale=float("nan"))
    with pytest.raises(InvalidInputError, match="dilate"):
        tiny_editor.edit(template.template_id, np.ones(res), "x", dilate=-1)
    with pytest.raises(InvalidInputError, match="characters"):
        tiny_editor.edit(template.template_id, np.ones(res), "x" * 5000)


def test_template_of_another_model_is_refused(tiny_editor, small_editor, template):
    small_editor.store = tiny_editor.store
    res = small_editor.model.info.resolution
    with pytest.raises(CacheMismatchError, match="registered with model"):
        small_editor.edit(template.template_id, np.ones(res), "x")


def test_every_error_class_has_its_own_stable_code_and_a_grpc_status():
    from instgenie.engine import errors
    from instgenie.engine.serving.loop import RequestAborted
    from instgenie.engine.serving.scheduler import Status

    classes = errors.error_classes()
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes)), sorted(codes)
    grpc = {"INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION", "DATA_LOSS", "UNAVAILABLE",
            "INTERNAL"}
    assert all(c.grpc_code in grpc for c in classes)
    # the codes the services map (a rename is a breaking change of the wire contract)
    assert {c.__name__: c.code for c in classes}.items() >= {
        "InvalidMaskError": "INVALID_MASK", "EmptyMaskError": "EMPTY_MASK", "InvalidStepsError": "INVALID_STEPS",
        "InvalidPromptError": "INVALID_PROMPT", "InvalidImageError": "INVALID_IMAGE",
        "ImageTooLargeError": "IMAGE_TOO_LARGE", "InvalidSeedError": "INVALID_SEED",
        "InvalidGuidanceError": "INVALID_GUIDANCE", "InvalidTemplateIdError": "INVALID_TEMPLATE_ID",
        "TemplateNotFoundError": "TEMPLATE_NOT_FOUND", "CacheMismatchError": "CACHE_MISMATCH",
        "CacheIntegrityError": "CACHE_INTEGRITY", "CacheUnavailableError": "CACHE_UNAVAILABLE",
        "ModelLoadError": "MODEL_LOAD"}.items()
    assert issubclass(errors.ImageTooLargeError, errors.InvalidImageError)
    assert errors.ImageTooLargeError.grpc_code == "INVALID_ARGUMENT"
    aborted = RequestAborted(Status.EXPIRED, "x")
    assert (aborted.code, aborted.grpc_code) == ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED")


def test_errors_carry_the_field_at_fault():
    from instgenie.engine.errors import InvalidInputError, TemplateNotFoundError

    err = InvalidInputError("bad", field="seed")
    assert err.field == "seed" and str(err) == "bad" and isinstance(err, ValueError)
    assert InvalidInputError("bad").field is None
    missing = TemplateNotFoundError("template 'x' does not exist", field="template_id")
    assert str(missing) == "template 'x' does not exist" and isinstance(missing, KeyError)
