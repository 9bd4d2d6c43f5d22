"""UNet inpainting presets (stable-diffusion-2-inpainting's shape) from config with seeded weights; SD components."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import torch

from ..models.base import TextEmbeddings
from ..models.flux import VaeCodec
from ..validation import validate_prompt

#: CPU presets. `channels` per UNet level; every level but the last has cross-attention transformer blocks
#: (as SD2: CrossAttnDown x3 + Down), so O-caching runs at every level but the coarsest. `heads` per level
#: (diffusers' `attention_head_dim` of SD2 configs is the head count).
UNET_PRESETS: dict[str, dict] = {
    "sd2-inpaint-tiny": dict(resolution=128, channels=(32, 64, 64), heads=(2, 4, 4), steps=4),
    # wider and 512 px (64 x 64 latents, 4096 tokens at the finest level) for the engine benchmark
    "sd2-inpaint-bench": dict(resolution=512, channels=(64, 128, 128), heads=(2, 4, 4), steps=8),
}
TEXT_DIM = 32


def build_unet_preset(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """A StableDiffusionInpaintPipeline of the named preset (9-channel UNet, tiny VAE, CLIP), saved to `out_dir`."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models.flux import _byte_level_tokenizers
    from ..models.loader import _quiet_libraries

    _quiet_libraries()
    if name not in UNET_PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(UNET_PRESETS)}")
    p = UNET_PRESETS[name]
    torch.manual_seed(seed)
    clip_tok, _ = _byte_level_tokenizers()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=TEXT_DIM, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                        projection_dim=TEXT_DIM, bos_token_id=clip_tok.bos_token_id,
                                        eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 32, 32),
                        latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=p["resolution"],
                        scaling_factor=0.18215)
    levels = len(p["channels"])
    unet = UNet2DConditionModel(
        sample_size=p["resolution"] // 8, in_channels=9, out_channels=4, layers_per_block=1,
        block_out_channels=p["channels"], norm_num_groups=8, cross_attention_dim=TEXT_DIM,
        attention_head_dim=p["heads"], use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    pipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=clip, tokenizer=clip_tok, unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "instgenie_model.json").write_text(json.dumps({
        "kind": "unet", "model_id": f"{name}-seed{seed}", "family": "unet-inpaint",
        "resolution": [p["resolution"], p["resolution"]], "default_steps": p["steps"], "guidance": "cfg",
        "default_guidance_scale": 7.5,
    }, indent=2))
    return out


class ClipTextEncoder:
    """Stable Diffusion prompt encoding through the pipeline's own `encode_prompt` (CLIP last hidden state).

    `pooled` is empty (the UNet takes none) and `text_ids` are zeros: the fields exist for the shared contract.
    Serialised by a lock for the same reason as FluxTextEncoder: the fast tokenizer is stateful.
    """

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self._lock = threading.Lock()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextEmbeddings:
        for p in prompts:
            validate_prompt(p)
        device = self.pipeline.unet.device
        with self._lock:
            embeds, _ = self.pipeline.encode_prompt(list(prompts), device, 1, False)
        return TextEmbeddings(embeds, embeds.new_zeros(embeds.shape[0], 0), embeds.new_zeros(embeds.shape[1], 3))


#: SD's VAE is the Flux codec without a shift factor
SdVaeCodec = VaeCodec
