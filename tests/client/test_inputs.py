"""Input conversion: what images and masks the SDK accepts, what bytes it sends, and what it refuses."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from instgenie.client.inputs import image_bytes, mask_bytes


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


@pytest.mark.parametrize("convert", [image_bytes, mask_bytes])
def test_files_and_bytes_pass_through_untouched(tmp_path, convert):
    # Not even an image: the server validates formats, so the SDK must not second-guess or re-encode.
    payload = b"\x89PNG but not really"
    path = tmp_path / "input.bin"
    path.write_bytes(payload)
    assert convert(path) == payload
    assert convert(str(path)) == payload
    assert convert(payload) == payload
    assert convert(bytearray(payload)) == payload
    assert convert(memoryview(payload)) == payload


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        image_bytes(tmp_path / "nope.png")


def test_pil_image_becomes_png_with_same_pixels():
    image = Image.new("RGB", (5, 3), (10, 20, 30))
    decoded = decode(image_bytes(image))
    assert decoded.mode == "RGB" and decoded.size == (5, 3)
    assert decoded.getpixel((4, 2)) == (10, 20, 30)


def test_pil_image_in_a_mode_png_lacks_is_converted_to_rgb():
    decoded = decode(image_bytes(Image.new("CMYK", (4, 4), (0, 255, 255, 0))))
    assert decoded.mode == "RGB" and decoded.getpixel((0, 0)) == (255, 0, 0)


def test_pil_mask_keeps_its_alpha_channel():
    # Strokes painted on a transparent canvas: the server reads alpha, so it must survive the trip.
    canvas = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    canvas.putpixel((1, 1), (0, 0, 0, 255))
    decoded = decode(mask_bytes(canvas))
    assert decoded.mode == "RGBA" and decoded.getpixel((1, 1))[3] == 255 and decoded.getpixel((0, 0))[3] == 0


def test_numpy_images():
    rgb = np.zeros((3, 5, 3), np.uint8)
    rgb[1, 2] = (1, 2, 3)
    decoded = decode(image_bytes(rgb))
    assert decoded.mode == "RGB" and decoded.size == (5, 3) and decoded.getpixel((2, 1)) == (1, 2, 3)
    assert decode(image_bytes(np.full((2, 2, 4), 255, np.uint8))).mode == "RGBA"
    assert decode(image_bytes(np.full((2, 2), 0.5))).getpixel((0, 0)) == 128
    assert decode(image_bytes(np.full((2, 2), 200, np.int64))).getpixel((0, 0)) == 200


@pytest.mark.parametrize("array,problem", [
    (np.full((2, 2), np.nan), "NaN"),
    (np.full((2, 2), 1.5), "[0, 1]"),
    (np.full((2, 2), 300), "[0, 255]"),
    (np.zeros((2, 2, 2), np.uint8), "shape"),
    (np.zeros(4, np.uint8), "shape"),
    (np.zeros((0, 3), np.uint8), "empty"),
])
def test_numpy_images_refused(array, problem):
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        image_bytes(array)


EXPECTED = np.array([[0, 255], [255, 0]], np.uint8)


@pytest.mark.parametrize("mask", [
    np.array([[False, True], [True, False]]),
    np.array([[0, 1], [1, 0]]),
    np.array([[0, 1], [1, 0]], np.uint8),
    np.array([[0, 255], [255, 0]], np.uint8),
    np.array([[0.0, 1.0], [1.0, 0.0]]),
    np.array([[0, 1], [1, 0]], np.float32)[:, :, None],
])
def test_numpy_masks_become_grey_png_with_white_edit(mask):
    decoded = decode(mask_bytes(mask))
    assert decoded.mode == "L"
    assert np.array_equal(np.asarray(decoded), EXPECTED)


def test_float_mask_keeps_its_grey_levels():
    decoded = decode(mask_bytes(np.array([[0.0, 0.5]])))
    assert np.asarray(decoded).tolist() == [[0, 128]]


def test_pil_mask_in_float_mode_goes_through_the_array_rules():
    decoded = decode(mask_bytes(Image.fromarray(np.array([[0.0, 1.0]], np.float32))))
    assert decoded.mode == "L" and np.asarray(decoded).tolist() == [[0, 255]]


@pytest.mark.parametrize("mask,problem", [
    (np.array([[0.0, np.nan]]), "NaN"),
    (np.array([[0.0, 1.2]]), r"\[0, 1\]"),
    (np.array([[-0.1, 1.0]]), r"\[0, 1\]"),
    (np.array([[0, 1, 255]], np.uint8), "0/1 or only 0/255"),
    (np.array([[0, 128]], np.uint8), "threshold"),
    (np.array([[0, -1]]), "0/1 or only 0/255"),
    (np.zeros((2, 2, 3), np.uint8), "2-D"),
    (np.zeros(4, np.uint8), "2-D"),
    (np.zeros((0, 0), bool), "empty"),
    (np.array([["a"]]), "dtype"),
])
def test_ambiguous_masks_refused(mask, problem):
    with pytest.raises(ValueError, match=problem):
        mask_bytes(mask)


@pytest.mark.parametrize("convert", [image_bytes, mask_bytes])
def test_unknown_types_refused(convert):
    with pytest.raises(TypeError, match="list"):
        convert([[0, 1]])
