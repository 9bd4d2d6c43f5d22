"""FLUX.1-Fill family: mask channels as input; sparse vs dense oracle, vs FluxFillPipeline, loader."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from instgenie.engine.models.fill import fill_condition
from instgenie.engine.models.loader import load_model
from tests.engine.helpers import masks_for, random_image


def test_preset_has_fill_dev_input_layout(fill_model):
    cfg = fill_model.transformer.config
    assert (cfg.in_channels, cfg.out_channels) == (384, 64)  # 64 latents + 64 masked image + 256 mask
    assert fill_model.info.family == "flux-fill" and type(fill_model.pipeline).__name__ == "FluxFillPipeline"


@pytest.mark.parametrize("mode", ["kv", "y"])
def test_sparse_matches_dense_reference_for_irregular_masks(fill_editor, mode):
    res = fill_editor.model.info.resolution
    manifest = fill_editor.register_template(random_image(res, 4), "a cat", mode=mode, seed=6)
    for name, mask in masks_for(res).items():
        sparse = fill_editor.edit(manifest.template_id, mask, "a dog", seed=2)
        dense = fill_editor.edit(manifest.template_id, mask, "a dog", seed=2, path="dense")
        err = (sparse.latents - dense.latents).abs().max().item()
        assert err < 1e-5, f"{mode}/{name}: sparse differs from the dense reference by {err}"


def test_the_mask_channels_reach_the_model(fill_editor):
    """Two masks with the same token set but different pixels condition the model differently."""
    res = fill_editor.model.info.resolution
    manifest = fill_editor.register_template(random_image(res, 5), "p", seed=1)
    a = np.zeros(res); a[16:48, 16:48] = 1
    b = a.copy(); b[17:47, 17:47] = 0  # a ring: same tokens, other pixels
    ra = fill_editor.edit(manifest.template_id, a, "p", seed=3, paste_back=False)
    rb = fill_editor.edit(manifest.template_id, b, "p", seed=3, paste_back=False)
    assert (ra.latents - rb.latents).abs().max().item() > 1e-4


def test_condition_layout_equals_the_pipelines(fill_model):
    pipe, codec = fill_model.pipeline, fill_model.codec
    res = fill_model.info.resolution
    image = torch.from_numpy(random_image(res, 8)).permute(2, 0, 1)[None].float() / 127.5 - 1
    pixels = torch.from_numpy(masks_for(res)["disc"] > 0)
    ours = fill_condition(codec, image, pixels)
    mask = pixels.float()[None, None]
    raw = pipe.vae.encode(image * (1 - mask)).latent_dist.mode()  # pipeline takes latents as they are
    stock_mask, stock_latents = pipe.prepare_mask_latents(mask, raw, 1, 16, 1, res[0], res[1], torch.float32,
                                                          "cpu", None)
    assert torch.equal(ours, torch.cat([stock_latents, stock_mask], dim=-1))


def test_full_mask_equals_flux_fill_pipeline(fill_editor, monkeypatch):
    import diffusers.pipelines.flux.pipeline_flux_fill as stock_module

    # The pipeline samples the masked image's latent distribution; ours takes its mode (models/fill.py).
    # Everything else is the stock pipeline's own code: mask processing, packing, schedule, loop.
    real = stock_module.retrieve_latents
    monkeypatch.setattr(stock_module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": real(out, generator, "argmax"))
    model = fill_editor.model
    res = model.info.resolution
    template = Image.fromarray(random_image(res, 3))
    manifest = fill_editor.register_template(template, "a cat", mode="kv", seed=3)
    ours = fill_editor.edit(manifest.template_id, np.ones(res), "a dog", seed=5, guidance_scale=30.0)
    # With mask = all the masked image is all zeros, a degenerate VAE input whose encoding depends on memory
    # layout (torch CPU: up to 1.8 apart for channels-last vs contiguous); the pipeline gets the template as the
    # contiguous tensor we encode, rather than a PIL image it would convert to channels-last strides.
    image = fill_editor.store.shard(manifest, "base.safetensors")["image"]
    stock = model.pipeline(
        prompt="a dog", image=image, mask_image=Image.fromarray(np.full(res, 255, np.uint8)), height=res[0],
        width=res[1], num_inference_steps=manifest.steps, guidance_scale=30.0,
        latents=fill_editor._noise(5, res), output_type="latent", max_sequence_length=8,
    ).images
    assert (stock - ours.latents).abs().max().item() < 1e-5


def test_empty_mask_returns_the_template(fill_editor):
    res = fill_editor.model.info.resolution
    image = random_image(res, 9)
    manifest = fill_editor.register_template(image, "", mode="y", seed=1)
    result = fill_editor.edit(manifest.template_id, np.zeros(res), "anything", seed=3, allow_empty_mask=True)
    assert torch.equal(result.latents, fill_editor.store.shard(manifest, "base.safetensors")["image_latents"])
    assert np.array_equal(np.asarray(result.image), image)


def test_a_checkpoint_directory_naming_flux_fill_pipeline_loads_as_fill(fill_model, model_root, tmp_path):
    src = model_root / "flux-fill-tiny-seed0"
    dst = tmp_path / "FLUX.1-Fill-dev"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("instgenie_model.json"))
    model = load_model(dst)
    assert model.info.family == "flux-fill" and model.info.default_steps == 50
    assert model.info.default_guidance_scale == 30.0 and model.transformer.config.in_channels == 384
