"""Image and mask rules of the engine boundary: bounded decoding, decompression bombs, mask modes, token counts."""
from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from instgenie.engine.errors import EmptyMaskError, ImageTooLargeError, InvalidImageError, InvalidMaskError
from instgenie.engine.images import (
    ImageLimits, decode_image, dilate_grid, image_to_array, mask_from_array, mask_from_image, mask_tokens,
)
from instgenie.engine.masks import load_mask, tokens_from_mask
from tests.engine.helpers import random_image

MB = 1024 * 1024


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid 8-bit grey PNG of all-zero rows: tiny on disk, width x height bytes once inflated."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = bomb_png(12_000, 12_000)  # 144 M pixels: 144 MB as 8-bit, 1.7 GB as the float32 RGB the engine uses
    assert len(data) < 300_000
    return data


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_rss_growth_mb(fn) -> float:
    """MB the process's peak resident memory rose above its current size while `fn` ran (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak (VmHWM) to the current RSS
    except OSError:
        pytest.skip("needs /proc/self/clear_refs to measure peak memory")
    base = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - base) / 1024


# ------------------------------------------------------------------------------------------------ decoding
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, looser check
def test_decompression_bomb_is_refused_from_its_header_in_every_entry(bomb, tiny_editor):
    res = tiny_editor.model.info.resolution

    def refuse(call, error=ImageTooLargeError):
        def run():
            with pytest.raises(error, match="12000x12000 = 144000000 pixels"):
                call()
        return run

    lazy = Image.open(io.BytesIO(bomb))  # opened, not decoded
    entries = {
        "decode_image": refuse(lambda: decode_image(bomb)),
        "register bytes": refuse(lambda: tiny_editor.register_template(bomb, "p")),
        "register lazy PIL": refuse(lambda: tiny_editor.register_template(lazy, "p")),
        "mask bytes": refuse(lambda: load_mask(bomb, res)),
        "mask lazy PIL": refuse(lambda: mask_from_image(lazy, res)),
    }
    for name, run in entries.items():
        growth = peak_rss_growth_mb(run)
        assert growth < 100, f"{name}: peak memory rose by {growth:.0f} MB"


def test_limits_are_configurable_and_bytes_are_checked_first():
    small = png_bytes(Image.fromarray(random_image((64, 64), 1)))
    with pytest.raises(ImageTooLargeError, match="at most 100 are accepted") as err:
        decode_image(small, ImageLimits(max_bytes=100))
    assert err.value.field == "image" and err.value.code == "IMAGE_TOO_LARGE"
    with pytest.raises(ImageTooLargeError, match="64x64 = 4096 pixels; at most 4095"):
        decode_image(small, ImageLimits(max_pixels=4095))
    assert decode_image(small, ImageLimits(max_pixels=4096)).size == (64, 64)
    with pytest.raises(ValueError):
        ImageLimits(max_pixels=0)


def test_truncated_corrupt_and_foreign_files_are_typed_input_errors():
    good = png_bytes(Image.fromarray(random_image((64, 64), 2)))
    cases = {
        "truncated": good[: len(good) // 2],
        "garbage": b"this is not an image at all",
        "header only": good[:40],
        "flipped byte": good[:60] + bytes([good[60] ^ 0xFF]) + good[61:],
        "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
    }
    for name, data in cases.items():
        with pytest.raises(InvalidImageError) as err:
            decode_image(data)
        assert err.value.field == "image", name
    with pytest.raises(InvalidMaskError, match="mask"):
        decode_image(b"", field="mask")
    with pytest.raises(InvalidImageError, match="bytes"):
        decode_image("a string")  # type: ignore[arg-type]


def test_the_gateway_modules_do_not_import_torch():
    code = ("import sys; import instgenie.engine.images, instgenie.engine.errors, instgenie.engine.ids, "
            "instgenie.engine.validation; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------------- masks
def test_mask_modes_follow_one_convention():
    grey = np.zeros((8, 8), np.uint8)
    grey[2:4, 2:6] = 200
    grey[0, 0] = 127  # below half range
    want = grey >= 128
    rgba_strokes = np.zeros((8, 8, 4), np.uint8)
    rgba_strokes[..., 3] = np.where(want, 255, 0)  # black strokes on a transparent canvas, as a browser exports
    la_strokes = rgba_strokes[..., [0, 3]]
    palette = Image.fromarray(grey).convert("P")
    cases = {
        "1": Image.fromarray(want).convert("1"),
        "L": Image.fromarray(grey),
        "RGB": Image.fromarray(grey).convert("RGB"),
        "P": palette,
        "RGBA strokes": Image.fromarray(rgba_strokes),
        "LA strokes": Image.fromarray(la_strokes),
        "RGBA opaque": Image.fromarray(grey).convert("RGBA"),  # constant alpha: luminance rule
        "F": Image.fromarray(want.astype(np.float32)),
        "I": Image.fromarray(grey.astype(np.int32)),
        "I;16": Image.fromarray(want.astype(np.uint16) * 65535),
        "PNG bytes RGBA": decode_image(png_bytes(Image.fromarray(rgba_strokes))),
    }
    for name, img in cases.items():
        got = mask_from_image(img, (8, 8))
        assert got.dtype == bool and np.array_equal(got, want), name
    pa = Image.fromarray(rgba_strokes).convert("PA")
    assert np.array_equal(mask_from_image(pa, (8, 8)), want)


def test_out_of_range_mask_values_are_errors_never_empty_masks():
    bad = {
        "F above 1": Image.fromarray(np.full((8, 8), 255.0, np.float32)),
        "F NaN": Image.fromarray(np.full((8, 8), np.nan, np.float32)),
        "I above 255": Image.fromarray(np.full((8, 8), 1000, np.int32)),
        "CMYK-less exotic": Image.new("HSV", (8, 8)),
    }
    for name, img in bad.items():
        with pytest.raises(InvalidMaskError) as err:
            mask_from_image(img, (8, 8))
        assert not isinstance(err.value, EmptyMaskError) and err.value.field == "mask", name
    arrays = {
        "float 0..255": np.full((8, 8), 255.0),
        "float negative": np.full((8, 8), -0.5),
        "int above 255": np.full((8, 8), 256),
        "int negative": np.full((8, 8), -1),
        "complex": np.ones((8, 8), complex),
        "object": np.array([[object()]]),
        "float RGB": np.ones((8, 8, 3)),
        "5 channels": np.ones((8, 8, 5), np.uint8),
        "3-D stack": np.ones((2, 8, 8)),
    }
    for name, arr in arrays.items():
        with pytest.raises(InvalidMaskError) as err:
            mask_from_array(arr, (8, 8))
        assert not isinstance(err.value, EmptyMaskError), name
    with pytest.raises(EmptyMaskError, match="0/1"):
        mask_from_array(np.ones((8, 8), np.uint8), (8, 8), allow_empty=False)  # 1 of 255 is black


def test_array_and_tensor_masks_use_the_image_rules():
    want = np.zeros((8, 8), bool)
    want[1:5, 3:7] = True
    forms = [want, want.astype(np.uint8) * 255, want.astype(np.float64), want.astype(np.float32)[None],
             np.repeat((want * 255).astype(np.uint8)[..., None], 3, -1), torch.from_numpy(want),
             torch.from_numpy(want).float()[None, None], torch.from_numpy(want).to(torch.bfloat16),
             torch.from_numpy(want.astype(np.uint8) * 255)]
    for form in forms:
        assert np.array_equal(load_mask(form, (8, 8)).numpy(), want), type(form)


@pytest.mark.parametrize("scale,dilate", [(1, 0), (1, 2), (8, 0), (8, 1), (8, 3), (2, 1)])
def test_mask_tokens_counts_exactly_what_tokens_from_mask_computes(scale, dilate):
    rng = np.random.default_rng(scale * 10 + dilate)
    side = 16 * scale * 2
    for density in (0.0005, 0.01, 0.2, 0.9):
        mask = rng.random((side, side + 4 * scale)) < density
        tm = tokens_from_mask(torch.from_numpy(mask), scale, 4, dilate)
        assert mask_tokens(mask, scale, dilate) == int(tm.tokens.sum())


def test_dilation_grows_by_a_square_window():
    grid = np.zeros((7, 7), bool)
    grid[3, 3] = True
    assert dilate_grid(grid, 1).sum() == 9 and dilate_grid(grid, 3).all()
    assert np.array_equal(dilate_grid(grid, 0), grid)


# --------------------------------------------------------------------------------------------------- images
def test_template_images_are_read_strictly():
    rgb = random_image((16, 16), 3)
    assert np.array_equal(image_to_array(rgb, 3), rgb)
    assert np.array_equal(image_to_array(png_bytes(Image.fromarray(rgb)), 3), rgb)
    assert np.array_equal(image_to_array(rgb.astype(np.int64), 3), rgb)  # same values, wider integer type
    grey = image_to_array(rgb, 1)
    assert grey.shape == (16, 16, 1)
    assert np.array_equal(grey[..., 0], np.asarray(Image.fromarray(rgb).convert("L")))  # PIL's luma weights
    assert np.array_equal(image_to_array(np.dstack([rgb, np.full((16, 16), 7, np.uint8)]), 3), rgb)  # alpha dropped
    bad = {
        "float in [0, 1]": rgb / 255.0,
        "float in [0, 255]": rgb.astype(np.float32),
        "above 255": rgb.astype(np.int32) + 256,
        "negative": rgb.astype(np.int32) - 256,
        "bool": rgb > 128,
        "5 channels": np.zeros((16, 16, 5), np.uint8),
        "1-D": np.zeros(16, np.uint8),
        "16-bit PIL": Image.fromarray(np.zeros((16, 16), np.uint16)),
        "float PIL": Image.fromarray(np.zeros((16, 16), np.float32)),
        "not an image": "image.png",
    }
    for name, value in bad.items():
        with pytest.raises(InvalidImageError) as err:
            image_to_array(value, 3)
        assert err.value.field == "image", name


def test_the_editors_limits_apply_to_its_images_and_masks(tiny_model, tmp_path):
    from instgenie.engine.editor import Editor
    from instgenie.engine.request import EditRequest
    from instgenie.engine.template_cache import DirectoryBlobStore, TemplateStore

    res = tiny_model.info.resolution
    store = TemplateStore(DirectoryBlobStore(tmp_path / "store"))
    tpl = Editor(tiny_model, store).register_template(random_image(res, 1), "p", steps=1).template_id
    strict = Editor(tiny_model, store, image_limits=ImageLimits(max_pixels=res[0] * res[1] - 1))
    with pytest.raises(ImageTooLargeError, match="at most 16383"):
        strict.register_template(png_bytes(Image.fromarray(random_image(res, 2))), "p", steps=1)
    mask = np.zeros(res, np.uint8)
    mask[:16, :16] = 255
    with pytest.raises(ImageTooLargeError) as err:
        strict.start(EditRequest(tpl, png_bytes(Image.fromarray(mask)), "p"))
    assert err.value.field == "mask"
