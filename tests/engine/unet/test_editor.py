"""UNet family with O-caching: sparse vs dense oracle, vs StableDiffusionInpaintPipeline, edge masks, cache."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from instgenie.engine.errors import InvalidInputError
from instgenie.engine.models.loader import load_model
from instgenie.engine.template_cache import step_shard
from instgenie.engine.unet.ocache import block_levels, o_cache_bytes, self_attention_blocks
from tests.engine.helpers import masks_for, random_image


def test_preset_has_the_sd2_inpainting_shape(unet_model):
    unet = unet_model.transformer
    assert unet.config.in_channels == 9 and unet.config.out_channels == 4
    assert unet_model.info.family == "unet-inpaint" and unet_model.info.guidance == "cfg"
    assert unet_model.num_blocks == len(self_attention_blocks(unet)) == 7
    assert unet_model.cell == 32  # VAE /8, then two halvings


@pytest.mark.parametrize("res", [(128, 128), (96, 160)])
def test_sparse_matches_dense_reference_for_irregular_masks(unet_editor, res):
    manifest = unet_editor.register_template(random_image(res, 1), "a cat", seed=3)
    assert manifest.cache_mode == "o" and manifest.resolution == res
    for name, mask in masks_for(res).items():
        sparse = unet_editor.edit(manifest.template_id, mask, "a dog", seed=4)
        dense = unet_editor.edit(manifest.template_id, mask, "a dog", seed=4, path="dense")
        err = (sparse.latents - dense.latents).abs().max().item()
        assert err < 1e-5, f"{res}/{name}: sparse differs from the dense reference by {err}"


def test_the_cache_really_substitutes_unmasked_outputs(unet_editor):
    """A different prompt changes every token's attention output, so the oracle differs from stock full compute."""
    res = unet_editor.model.info.resolution
    manifest = unet_editor.register_template(random_image(res, 2), "a cat", seed=1)
    mask = masks_for(res)["disc"]
    dense = unet_editor.edit(manifest.template_id, mask, "a ship", seed=2, path="dense")
    full = unet_editor.edit(manifest.template_id, mask, "a ship", seed=2, path="full")
    assert (dense.latents - full.latents).abs().max().item() > 1e-5


def test_full_mask_equals_stable_diffusion_inpaint_pipeline(unet_editor, monkeypatch):
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as stock_module

    # The pipeline samples the masked image's latent distribution; we take its mode (deterministic).
    real = stock_module.retrieve_latents
    monkeypatch.setattr(stock_module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": real(out, generator, "argmax"))
    model = unet_editor.model
    res = model.info.resolution
    template = Image.fromarray(random_image(res, 3))
    manifest = unet_editor.register_template(template, "a cat", seed=3)
    ours = unet_editor.edit(manifest.template_id, np.ones(res), "a dog", seed=5, guidance_scale=7.5)
    # With mask = all the masked image is all zeros, a degenerate VAE input whose encoding depends on memory
    # layout (torch CPU: up to 1.8 apart for channels-last vs contiguous); the pipeline gets the template as the
    # contiguous tensor we encode, rather than a PIL image it would convert to channels-last strides.
    image = unet_editor.store.shard(manifest, "base.safetensors")["image"]
    stock = model.pipeline(
        prompt="a dog", image=image, mask_image=Image.fromarray(np.full(res, 255, np.uint8)), height=res[0],
        width=res[1], strength=1.0, num_inference_steps=manifest.steps, guidance_scale=7.5,
        latents=unet_editor._noise(5, res), output_type="latent",
    ).images
    assert (stock - ours.latents).abs().max().item() < 1e-5


def test_empty_mask_returns_the_template(unet_editor):
    res = unet_editor.model.info.resolution
    image = random_image(res, 5)
    manifest = unet_editor.register_template(image, "", seed=1)
    result = unet_editor.edit(manifest.template_id, np.zeros(res), "anything", seed=3, allow_empty_mask=True)
    assert torch.equal(result.latents, unet_editor.store.shard(manifest, "base.safetensors")["image_latents"])
    assert np.array_equal(np.asarray(result.image), image)


def test_cache_format_and_size(unet_editor):
    model = unet_editor.model
    res = (96, 160)
    manifest = unet_editor.register_template(random_image(res, 6), "p", steps=2, seed=1)
    shard = unet_editor.store.shard(manifest, step_shard(0))
    channels = {b: blk.attn1.to_out[0].out_features for b, blk in enumerate(self_attention_blocks(model.transformer))}
    levels = block_levels(model.transformer)
    for b, c in channels.items():
        assert tuple(shard[f"o.{b}"].shape) == (2, (12 >> levels[b]) * (20 >> levels[b]), c)
    assert sorted(set(levels)) == [0, 1, 2]  # the mid block's level holds a cache too
    data = sum(t.numel() * t.element_size() for i in range(2)
               for t in unet_editor.store.shard(manifest, step_shard(i)).values())
    assert data == o_cache_bytes(model.transformer, (12, 20), steps=2, branches=2, element_bytes=4)


def test_only_the_o_mode_is_accepted(unet_editor):
    res = unet_editor.model.info.resolution
    with pytest.raises(InvalidInputError, match="cache mode"):
        unet_editor.register_template(random_image(res, 1), "p", mode="kv")


def test_a_checkpoint_directory_loads_as_the_unet_family(unet_model, model_root, tmp_path):
    dst = tmp_path / "stable-diffusion-2-inpainting"
    shutil.copytree(model_root / "sd2-inpaint-tiny-seed0", dst, ignore=shutil.ignore_patterns("instgenie_model.json"))
    model = load_model(dst)
    assert model.is_unet and model.info.default_steps == 50 and model.info.resolution == (512, 512)


def test_a_unet_whose_self_attention_is_not_plain_is_refused_at_instrumentation(unet_model):
    import copy

    from instgenie.engine.errors import ModelLoadError
    from instgenie.engine.unet.ocache import OCacheProcessor, instrument_unet

    unet = copy.deepcopy(unet_model.transformer)
    for block in self_attention_blocks(unet):
        block.attn1.set_processor(getattr(block.attn1.processor, "original", block.attn1.processor))
    self_attention_blocks(unet)[3].attn1.residual_connection = True
    with pytest.raises(ModelLoadError, match="block 3"):
        instrument_unet(unet)
    # Refused before anything was installed: no block half-instrumented.
    assert not any(isinstance(b.attn1.processor, OCacheProcessor) for b in self_attention_blocks(unet))
