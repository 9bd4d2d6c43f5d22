"""Inputs shared by engine tests: seeded images and masks of several shapes."""
from __future__ import annotations

import numpy as np


def random_image(resolution, seed=0, channels=3):
    rng = np.random.default_rng(seed)
    h, w = resolution
    shape = (h, w, channels) if channels > 1 else (h, w)
    return (rng.random(shape) * 255).astype(np.uint8)


def masks_for(resolution):
    """Masks of several shapes: a token-aligned box, an unaligned box, a disc, scattered irregular pixels."""
    h, w = resolution
    yy, xx = np.mgrid[:h, :w]
    aligned = np.zeros((h, w)); aligned[: h // 2, : w // 4] = 1
    unaligned = np.zeros((h, w)); unaligned[h // 5: h // 5 + 19, w // 3: w // 3 + 23] = 1
    disc = (((yy - 0.6 * h) ** 2 + (xx - 0.4 * w) ** 2) < (0.2 * h) ** 2).astype(float)
    rng = np.random.default_rng(7)
    scattered = (rng.random((h, w)) > 0.995).astype(float)
    scattered[h - 3, 1] = 1
    return {"aligned": aligned, "unaligned": unaligned, "disc": disc, "scattered": scattered}
