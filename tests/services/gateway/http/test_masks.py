"""OpenAI's mask convention (alpha 0 = edit) to the engine's (white = edit), and `size`: pure functions."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from instgenie.services.gateway.http.errors import ApiError
from instgenie.services.gateway.http.masks import edit_region, engine_mask_png, fit, parse_size
from instgenie.services.gateway.validation import Limits, check_mask

from .helpers import openai_mask, png


def image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_only_fully_transparent_pixels_are_edited_and_the_gateway_accepts_the_converted_mask():
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[2:6, 3:9, 3] = 0  # the region
    rgba[10, :, 3] = 1  # almost transparent: kept, as OpenAI keeps it
    rgba[12, :, :3] = 255  # white but opaque: kept (colour means nothing in this convention)
    region = edit_region(image(png(rgba, "RGBA")))
    expected = np.zeros((16, 16), dtype=bool)
    expected[2:6, 3:9] = True
    assert np.array_equal(region, expected)
    engine = engine_mask_png(region)
    assert set(np.unique(np.asarray(image(engine)))) == {0, 255} and image(engine).mode == "L"
    # The gateway's own mask check takes it as it is (binary: never "mostly grey") and sees the same region.
    mask, tokens = check_mask(engine, 16, 16, 1, 0, Limits())
    assert np.array_equal(mask, expected) and tokens > 0


def test_palette_and_grey_alpha_masks_are_read_from_their_alpha():
    la = np.zeros((16, 16, 2), dtype=np.uint8)
    la[..., 1] = 255
    la[:, 8:, 1] = 0
    assert edit_region(image(png(la, "LA")))[:, 8:].all()
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 255, 255, 255])
    palette.paste(1, (0, 0, 4, 16))
    buf = io.BytesIO()
    palette.save(buf, format="PNG", transparency=1)  # palette index 1 is transparent
    region = edit_region(image(buf.getvalue()))
    assert region[:, :4].all() and not region[:, 4:].any()


@pytest.mark.parametrize("mask,code", [
    (png(np.full((16, 16), 255, np.uint8)), "invalid_mask"),  # no alpha: would silently swap meanings
    (openai_mask(np.zeros((16, 16), bool)), "empty_mask"),
])
def test_masks_that_select_nothing_in_this_convention_are_refused(mask, code):
    with pytest.raises(ApiError) as err:
        edit_region(image(mask))
    assert (err.value.status, err.value.code, err.value.param) == (400, code, "mask")


def test_size_is_the_images_or_a_served_one():
    assert parse_size(None) is None and parse_size("auto") is None and parse_size("16x24") == (16, 24)
    for bad in ("16", "16x", "x16", "0x16", "16X16", "-1x2", "1e3x2"):
        with pytest.raises(ApiError) as err:
            parse_size(bad)
        assert err.value.param == "size"
    picture = Image.new("L", (32, 32), 7)
    assert fit(picture, None, [(16, 16)]) is picture and fit(picture, (32, 32), []) is picture
    assert fit(picture, (16, 16), [(16, 16)]).size == (16, 16)
    with pytest.raises(ApiError) as err:
        fit(picture, (64, 64), [(16, 16)])
    assert err.value.code == "unsupported_size" and "16x16" in err.value.message
