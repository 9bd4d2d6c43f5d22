"""The Flux family: presets built from config with seeded weights, and loading of real local checkpoints."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import torch

from ..validation import MAX_PROMPT_CHARS, validate_prompt  # noqa: F401 - MAX_PROMPT_CHARS re-exported
from .base import TextEmbeddings

#: CPU presets. Hidden = heads x head_dim; `layers` = (dual-stream, single-stream) blocks; `text_tokens` is
#: the T5 sequence length. flux-bench has 1024 image tokens (512 px) and is what the engine benchmark uses.
PRESETS: dict[str, dict] = {
    "flux-tiny": dict(resolution=128, layers=(1, 2), heads=2, head_dim=16, text_tokens=8, guidance_embeds=False, steps=4),
    "flux-small": dict(resolution=256, layers=(2, 4), heads=4, head_dim=32, text_tokens=16, guidance_embeds=True, steps=8),
    "flux-bench": dict(resolution=512, layers=(2, 4), heads=8, head_dim=32, text_tokens=16, guidance_embeds=True, steps=8),
    # wider blocks (hidden 512): closer to real Flux's compute/overhead balance, for the engine benchmark
    "flux-wide": dict(resolution=512, layers=(2, 4), heads=8, head_dim=64, text_tokens=16, guidance_embeds=True, steps=8),
    # FLUX.1-Fill-dev's shape: masked-image latents and the 8x8 pixel mask as input channels (64 + 64 + 256 = 384)
    "flux-fill-tiny": dict(resolution=128, layers=(1, 2), heads=2, head_dim=16, text_tokens=8, guidance_embeds=True,
                           steps=4, fill=True),
    "flux-fill-bench": dict(resolution=512, layers=(2, 4), heads=8, head_dim=32, text_tokens=16, guidance_embeds=True,
                            steps=8, fill=True),
}


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Split head_dim into Flux's three RoPE axes (each even, summing to head_dim), like (16, 56, 56) for 128."""
    a = (head_dim // 8) // 2 * 2
    rest = head_dim - a
    b = rest // 2 // 2 * 2
    return a, b, rest - b


def _byte_level_tokenizers(max_clip: int = 77):
    """CLIP and T5 tokenizers with in-memory byte/char vocabularies: no files, no hub."""
    from transformers import CLIPTokenizer, T5TokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_clip)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(chr(c), -2.0) for c in range(32, 127)] + [("\u2581" + chr(c), -1.5) for c in range(33, 127)]
    t5 = T5TokenizerFast(vocab=pieces, extra_ids=0)
    return clip, t5


def build_flux_preset(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build the named preset with seeded random weights and save it to `out_dir`.

    A FluxInpaintPipeline (family "flux"), or a FluxFillPipeline (family "flux-fill") for `fill` presets.
    """
    from diffusers import (
        AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxInpaintPipeline, FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .loader import _quiet_libraries

    _quiet_libraries()
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[name]
    torch.manual_seed(seed)
    clip_tok, t5_tok = _byte_level_tokenizers()
    text_dim = 32
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=text_dim, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                        projection_dim=text_dim, bos_token_id=clip_tok.bos_token_id,
                                        eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=text_dim, d_kv=8, d_ff=64, num_layers=2,
                                 num_heads=4, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 32, 32),
                        latent_channels=16, layers_per_block=1, norm_num_groups=8, sample_size=p["resolution"],
                        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    fill = p.get("fill", False)
    packed = 4 * vae.config.latent_channels  # 2x2 packed latent channels
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    # Fill: noisy latents ++ masked-image latents ++ the pixel mask, one 8x8 patch per latent cell, packed 2x2
    in_channels = 2 * packed + 4 * vae_scale ** 2 if fill else packed
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, out_channels=packed if fill else None, num_layers=p["layers"][0],
        num_single_layers=p["layers"][1],
        attention_head_dim=p["head_dim"], num_attention_heads=p["heads"], joint_attention_dim=text_dim,
        pooled_projection_dim=text_dim, guidance_embeds=p["guidance_embeds"], axes_dims_rope=_rope_axes(p["head_dim"]),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                                                max_shift=1.15, use_dynamic_shifting=True)
    pipe_class = FluxFillPipeline if fill else FluxInpaintPipeline
    pipe = pipe_class(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok,
                      text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "instgenie_model.json").write_text(json.dumps({
        "kind": "flux", "model_id": f"{name}-seed{seed}", "family": "flux-fill" if fill else "flux",
        "resolution": [p["resolution"], p["resolution"]], "default_steps": p["steps"],
        "guidance": "distilled" if p["guidance_embeds"] else "none", "default_guidance_scale": 30.0 if fill else 3.5,
        "text_tokens": p["text_tokens"],
    }, indent=2))
    return out


class FluxTextEncoder:
    """CLIP (pooled) + T5 (sequence) prompt encoding through the pipeline's own `encode_prompt`.

    Thread-safe by a lock: the shared fast tokenizers are stateful (each call switches the Rust tokenizer's
    truncation and padding, and diffusers calls them twice per prompt with different settings), so two
    threads encoding at once could get embeddings of the wrong length: a different image with no error.
    """

    def __init__(self, pipeline, max_sequence_length: int):
        self.pipeline = pipeline
        self.max_sequence_length = max_sequence_length
        self._lock = threading.Lock()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextEmbeddings:
        for p in prompts:
            validate_prompt(p)
        device = self.pipeline.transformer.device
        with self._lock:
            embeds, pooled, text_ids = self.pipeline.encode_prompt(
                prompt=list(prompts), prompt_2=None, device=device, num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
            )
        return TextEmbeddings(embeds, pooled, text_ids)


class VaeCodec:
    """A diffusers VAE with its scaling and shift factors (Flux has both; SD's VAE has no shift); encodes to the
    distribution's mode (deterministic)."""

    image_channels = 3

    def __init__(self, vae):
        self.vae = vae
        self.scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = vae.config.latent_channels
        self.shift = getattr(vae.config, "shift_factor", None) or 0.0

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mode()
        return (latents - self.shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents / self.vae.config.scaling_factor + self.shift
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0].clamp(-1, 1)
