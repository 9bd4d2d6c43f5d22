"""The UNet FLOP count (engine/flops.py) against torch's FlopCounterMode on the engine's own UNet calls: stock and
O-caching at several masks and template sizes, the compact-mask estimate the scheduler uses, and the O-cache size."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from instgenie.engine.flops import UNetShape, compact_mask_tokens, unet_level_tokens, unet_step_flops
from instgenie.engine.unet.ocache import OCapture, activated, block_levels, level_masks, o_cache_bytes
from instgenie.engine.unet.step import unet_levels
from tests.engine.helpers import masks_for

SEQS = 2  # one request with CFG: unconditional and conditional sequence


def measured(fn) -> int:
    """FLOPs of one call as torch counts them; SDPA through its math backend (the fused CPU kernel is invisible
    to FlopCounterMode)."""
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def box(h: int, w: int, ratio: float, dy: int = 0, dx: int = 0) -> torch.Tensor:
    side = ratio ** 0.5
    bh, bw = max(1, round(h * side)), max(1, round(w * side))
    m = torch.zeros(h, w, dtype=torch.bool)
    y, x = min(h - bh, (h - bh) // 2 + dy), min(w - bw, (w - bw) // 2 + dx)
    m[y:y + bh, x:x + bw] = True
    return m


class Calls:
    """The UNet's stock call and its O-caching call on `SEQS` sequences of an h x w latent grid."""

    def __init__(self, model, h: int, w: int):
        self.unet = model.transformer
        g = torch.Generator().manual_seed(h * w)
        self.sample = torch.randn(SEQS, self.unet.config.in_channels, h, w, generator=g)
        self.call = dict(encoder_hidden_states=model.text.encode(["", "a photo"]).prompt_embeds, return_dict=False)
        self.text_tokens = self.call["encoder_hidden_states"].shape[1]
        self.t = torch.full((SEQS,), 500)
        record: dict = {}
        with torch.inference_mode(), activated(self.unet, OCapture(record=record)):
            self.unet(self.sample, self.t, **self.call)
        self.caches = [({k: v[s:s + 1] for k, v in record.items()}, 0) for s in range(SEQS)]

    def stock(self):
        return self.unet(self.sample, self.t, **self.call)

    def ocache(self, keep):
        def run():
            with activated(self.unet, OCapture(caches=self.caches, keep=keep, sparse=True)):
                return self.unet(self.sample, self.t, **self.call)
        return run


@pytest.fixture(scope="module")
def shape(unet_model):
    return UNetShape.of(unet_model.transformer)


def test_shape_of_the_preset(unet_model, shape):
    assert shape.channels == (32, 64, 64) and shape.levels == 3 and shape.layers == (1, 1, 1)
    assert shape.down_attention == (True, True, False) and shape.up_attention == (True, True, False)
    assert shape.mid_attention and shape.in_channels == 9 and shape.out_channels == 4
    assert shape.block_levels() == block_levels(unet_model.transformer)  # the cache's block numbering


@pytest.mark.parametrize("hw", [(16, 16), (12, 20)])  # the preset's 128 px, and a 96x160 template
def test_stock_count_matches_flop_counter(unet_model, shape, hw):
    calls = Calls(unet_model, *hw)
    counted = SEQS * unet_step_flops(shape, hw[0] * hw[1], calls.text_tokens)
    got = measured(calls.stock)
    assert counted == pytest.approx(got, rel=0.01), f"counted {counted:.4g}, FlopCounterMode {got:.4g}"


@pytest.mark.parametrize("hw", [(16, 16), (12, 20)])
def test_ocache_count_matches_flop_counter_at_several_masks(unet_model, shape, hw):
    h, w = hw
    calls = Calls(unet_model, h, w)
    stock = SEQS * unet_step_flops(shape, h * w, calls.text_tokens)
    masks = {f"box {r}": box(h, w, r) for r in (0.1, 0.25, 0.5)}
    masks["irregular"] = torch.from_numpy(masks_for((8 * h, 8 * w))["disc"] > 0).reshape(h, 8, w, 8).any(3).any(1)
    masks["one cell"] = torch.zeros(h, w, dtype=torch.bool)
    masks["one cell"][h - 1, 0] = True
    for name, mask in masks.items():
        keep = level_masks(mask.expand(SEQS, h, w), unet_levels(unet_model.transformer))
        per_level = [int(m[0].sum()) for m in keep.values()]
        counted = SEQS * unet_step_flops(shape, h * w, calls.text_tokens, per_level)
        got = measured(calls.ocache(keep))
        assert counted == pytest.approx(got, rel=0.01), f"{hw} {name}: counted {counted:.4g}, measured {got:.4g}"
        assert counted < stock, f"{name}: O-caching saves work"


def test_a_full_mask_counts_as_stock(shape):
    n = 16 * 16
    assert unet_step_flops(shape, n, 77, unet_level_tokens(n, 3)) == unet_step_flops(shape, n, 77)
    assert unet_step_flops(shape, n, 77, n) == unet_step_flops(shape, n, 77)  # the estimate caps every level


def test_compact_mask_estimate_is_close_to_the_engines_levels(shape):
    """The scheduler knows only the masked latent cells; for brush-stroke masks the estimate of the coarser
    levels' counts keeps the FLOPs within 2 % of what the engine's max-pooled masks compute."""
    h, w = 64, 64  # sd2-inpaint-bench's 512 px
    worst = 0.0
    rng = np.random.default_rng(0)
    for ratio in (0.02, 0.1, 0.2, 0.5):
        for _ in range(4):
            mask = box(h, w, ratio, int(rng.integers(-5, 6)), int(rng.integers(-5, 6)))
            exact = [int(m.sum()) for m in level_masks(mask[None], 3).values()]
            est = compact_mask_tokens(h * w, exact[0], 3)
            assert est[0] == exact[0]
            e, x = unet_step_flops(shape, h * w, 77, exact), unet_step_flops(shape, h * w, 77, exact[0])
            worst = max(worst, abs(x - e) / e)
    assert worst < 0.02, f"worst FLOP error of the estimate {worst:.1%}"


def test_o_cache_elements_match_the_engines_cache_size(unet_model, shape):
    for h, w in ((16, 16), (12, 20)):
        assert shape.o_cache_elements(h * w) * 3 * 2 * 4 == o_cache_bytes(unet_model.transformer, (h, w), 3, 2, 4)


def test_a_unet_the_count_does_not_model_is_refused(unet_model):
    class Config(dict):
        __getattr__ = dict.__getitem__

    class Fake:
        config = Config(unet_model.transformer.config)

    Fake.config["class_embed_type"] = "timestep"
    with pytest.raises(ValueError, match="class_embed_type"):
        UNetShape.of(Fake)
    Fake.config.update(class_embed_type=None, down_block_types=["SimpleCrossAttnDownBlock2D"] * 3)
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        UNetShape.of(Fake)


def test_per_level_counts_must_name_every_level(shape):
    with pytest.raises(ValueError, match="levels"):
        unet_step_flops(shape, 256, 77, [10, 3])
