"""Mask validation and the pixel -> token mapping."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from instgenie.engine.errors import EmptyMaskError, InvalidMaskError
from instgenie.engine.masks import load_mask, tokens_from_mask


def test_any_pixel_rule_marks_every_touched_token():
    mask = np.zeros((32, 32))
    mask[0, 0] = 1  # one pixel in token (0, 0)
    mask[17, 31] = 1  # one pixel in token (1, 1) with an 8 px VAE and 2x2 packing (16 px tokens)
    tm = tokens_from_mask(load_mask(mask, (32, 32)), scale_factor=8, latent_channels=16)
    assert tm.tokens.tolist() == [True, False, False, True]
    assert tm.index.tolist() == [0, 3]
    # Blend is per latent cell: only the touched 8x8 cells regenerate.
    assert tm.blend.shape == (1, 4, 64)
    assert tm.blend.sum().item() == 2 * 16


def test_dilation_grows_the_token_set_and_blend():
    mask = np.zeros((64, 64)); mask[24:40, 24:40] = 1
    plain = tokens_from_mask(load_mask(mask, (64, 64)), 8, 16)
    grown = tokens_from_mask(load_mask(mask, (64, 64)), 8, 16, dilate=1)
    assert plain.tokens.sum() < grown.tokens.sum()
    assert bool((grown.tokens | plain.tokens).eq(grown.tokens).all())
    assert grown.blend.sum() > plain.blend.sum()


def test_pixel_space_model_maps_pixels_directly():
    mask = np.zeros((16, 16)); mask[3, 3] = 1
    tm = tokens_from_mask(load_mask(mask, (16, 16)), scale_factor=1, latent_channels=1)
    assert tm.tokens.sum().item() == 1 and tm.index.item() == 1 * 8 + 1


def test_mask_forms_and_threshold():
    arr = np.zeros((8, 8), dtype=np.uint8); arr[2:4, 2:4] = 200; arr[0, 0] = 100
    from_pil = load_mask(Image.fromarray(arr), (8, 8))
    from_arr = load_mask(arr, (8, 8))
    from_rgb = load_mask(Image.fromarray(arr).convert("RGB"), (8, 8))
    assert torch.equal(from_pil, from_arr) and torch.equal(from_pil, from_rgb)
    assert from_pil.sum().item() == 4  # 100/255 is below half range


def test_bad_masks_raise_clear_errors():
    with pytest.raises(InvalidMaskError, match="16x8 .* template is 8x8"):
        load_mask(np.ones((8, 16)), (8, 8))
    with pytest.raises(EmptyMaskError, match="no pixel"):
        load_mask(np.zeros((8, 8)), (8, 8))
    with pytest.raises(InvalidMaskError, match="2-D"):
        load_mask(np.ones((2, 3, 8, 8)), (8, 8))
    with pytest.raises(InvalidMaskError, match="NaN"):
        load_mask(np.full((8, 8), np.nan), (8, 8))
    with pytest.raises(InvalidMaskError):
        load_mask("not a mask", (8, 8))
