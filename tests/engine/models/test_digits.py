"""The digits model: label encoder and pixel codec contracts, the shipped weights, the judge, reproducible training."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from instgenie.engine.errors import InvalidImageError, InvalidPromptError
from instgenie.engine.models.digits import (
    DigitsTextEncoder, LabelEmbedder, PixelCodec, classify, load_digits_dataset, load_digits_model, sample_digits,
)
from instgenie.engine.models.loader import DIGITS_DIR
from instgenie.engine.models.train_digits import train


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from two threads, and on a busy two-core box two threads spin-wait for seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shipped():
    return load_digits_model(DIGITS_DIR)


def test_label_embedder_round_trips_through_save_pretrained(tmp_path):
    torch.manual_seed(0)
    embedder = LabelEmbedder(num_labels=10, dim=32, seq_len=1)
    embedder.save_pretrained(tmp_path / "text_encoder")
    loaded = LabelEmbedder.from_pretrained(tmp_path / "text_encoder")
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(embedder.config) == {"num_labels": 10, "dim": 32, "seq_len": 1}
    assert loaded.embedding.weight.shape == (11, 32)  # 10 digits + the null label
    assert torch.equal(loaded.embedding.weight, embedder.embedding.weight)


def test_encode_gives_one_token_and_a_pooled_vector():
    embedder = LabelEmbedder()
    text = DigitsTextEncoder(embedder).encode(["3", "", " 7 "])
    assert text.prompt_embeds.shape == (3, 1, 32)
    assert text.pooled.shape == (3, 32)
    assert torch.equal(text.text_ids, torch.zeros(1, 3))
    assert torch.equal(text.prompt_embeds[1, 0], embedder.embedding.weight[embedder.null_label])  # "" = null label
    assert torch.equal(text.prompt_embeds[2, 0], embedder.embedding.weight[7])  # whitespace is ignored


@pytest.mark.parametrize("prompt", ["cat", "12", "-1", "3.", "\u0663", None])
def test_prompt_that_is_not_one_digit_is_rejected_with_the_rule(prompt):
    with pytest.raises(InvalidPromptError, match="single digit 0-9") as err:
        DigitsTextEncoder(LabelEmbedder()).encode(["1", prompt])
    assert repr(prompt) in str(err.value)
    assert err.value.grpc_code == "INVALID_ARGUMENT" and err.value.field == "prompt"


def test_pixel_codec_is_identity_on_grayscale_and_luminance_on_rgb():
    codec = PixelCodec()
    assert (codec.scale_factor, codec.latent_channels, codec.image_channels) == (1, 1, 1)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.equal(codec.encode(x), x)
    assert torch.equal(codec.decode(codec.encode(x)), x)
    assert torch.equal(codec.decode(x * 3), (x * 3).clamp(-1, 1))
    rgb = torch.stack([torch.full((16, 16), v) for v in (1.0, -1.0, 0.0)]).unsqueeze(0)  # pure red-ish
    assert torch.allclose(codec.encode(rgb), torch.full((1, 1, 16, 16), 0.299 - 0.587))
    with pytest.raises(InvalidImageError, match="grayscale"):
        codec.encode(torch.zeros(1, 2, 16, 16))


def test_dataset_split_is_fixed_and_in_range():
    train_x, train_y = load_digits_dataset("train")
    test_x, test_y = load_digits_dataset("test")
    assert train_x.shape == (1498, 1, 16, 16) and test_x.shape == (299, 1, 16, 16)
    assert train_x.min() >= -1 and train_x.max() <= 1 and train_x.mean() < -0.3  # mostly black background
    assert set(test_y.tolist()) == set(range(10)) and len(train_y) == 1498


def test_classifier_recognises_real_test_digits_after_the_16px_round_trip():
    images, labels = load_digits_dataset("test")
    assert np.mean(classify(images) == labels.numpy()) >= 0.95


def test_shipped_model_loads_and_runs_a_forward_pass(shipped):
    transformer, text, codec, scheduler, meta = shipped
    assert meta["kind"] == "digits" and meta["resolution"] == [16, 16] and meta["guidance"] == "cfg"
    assert scheduler.config.shift == 3.0 and not scheduler.config.use_dynamic_shifting
    cond = text.encode(["5", ""])
    latents = FluxPipeline._pack_latents(codec.encode(torch.zeros(2, 1, 16, 16)), 2, 1, 16, 16)
    with torch.no_grad():
        out = transformer(hidden_states=latents, timestep=torch.tensor([0.5, 0.5]), pooled_projections=cond.pooled,
                          encoder_hidden_states=cond.prompt_embeds, txt_ids=cond.text_ids,
                          img_ids=FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32),
                          return_dict=False)[0]
    assert out.shape == (2, 64, 4) and torch.isfinite(out).all()


def test_engine_loader_reads_the_shipped_model():
    from instgenie.engine.models.loader import load_model

    model = load_model(DIGITS_DIR)
    assert model.info.model_id == "digits-16px" and model.info.default_steps == 20
    assert model.info.default_guidance_scale == 2.0 and model.codec.latent_channels == 1


def test_shipped_model_draws_the_requested_digits(shipped):
    transformer, text, _, scheduler, _ = shipped
    wanted = np.repeat(np.arange(10), 2)
    images = sample_digits(transformer, text, scheduler, [str(d) for d in wanted], steps=20, guidance_scale=2.0,
                           generator=torch.Generator().manual_seed(0))
    assert images.shape == (20, 1, 16, 16)
    assert np.mean(classify(images) == wanted) >= 0.8  # train_digits checks 200 samples: 98.5%


def test_training_is_bit_reproducible(tmp_path):
    for run in ("a", "b"):
        train(tmp_path / run, steps=10, seed=3, batch_size=16, progress=False)
    for part in ("transformer", "text_encoder"):
        a = (tmp_path / "a" / part / "diffusion_pytorch_model.safetensors").read_bytes()
        b = (tmp_path / "b" / part / "diffusion_pytorch_model.safetensors").read_bytes()
        assert a == b, f"{part} weights differ between two runs with the same seed"
    assert (tmp_path / "a" / "scheduler" / "scheduler_config.json").exists()
    assert load_digits_model(tmp_path / "a")[4]["train"]["seed"] == 3
