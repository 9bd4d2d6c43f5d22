"""Synthetic transformer inputs and template caches, for benchmarks and cost calibration."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..latents import image_ids
from .cache_view import StepCache
from .reference import dense_forward
from .sparse import PackedStep


@dataclass
class SyntheticStep:
    inputs: dict  # dense_forward keyword arguments for the whole batch
    index: list[torch.Tensor]  # per sequence, the computed token positions
    shard: dict[str, torch.Tensor]  # a recorded step shard with one branch per sequence
    mode: str

    def caches(self) -> list[StepCache]:
        return [StepCache(self.shard, s) for s in range(len(self.index))]

    def cond_keys(self) -> list:
        """Modulation keys of this step's sequences: a second call with them reuses the first one's rows."""
        return [("synthetic", id(self), s) for s in range(len(self.index))]

    def packed(self, caches=None, use_cache=None, shared_modulation: bool = False) -> PackedStep:
        """The packed sparse-forward input; `shared_modulation` keys the modulation rows (see cond_keys)."""
        x = self.inputs["latents"]
        return PackedStep(
            x=torch.cat([x[s, idx] for s, idx in enumerate(self.index)]), token_index=self.index,
            prompt_embeds=self.inputs["prompt_embeds"], pooled=self.inputs["pooled"],
            timestep=self.inputs["timestep"], txt_ids=self.inputs["txt_ids"], img_ids=self.inputs["img_ids"],
            caches=caches if caches is not None else self.caches(), mode=self.mode,
            guidance=self.inputs["guidance"], x_full=x if self.mode == "y" else None, use_cache=use_cache,
            cond_keys=self.cond_keys() if shared_modulation else None,
        )


def synthetic_inputs(model, batch: int, seed: int = 0) -> dict:
    tr = model.transformer
    h, w = (r // model.codec.scale_factor for r in model.info.resolution)
    g = torch.Generator().manual_seed(seed)
    text = model.text.encode([f"prompt {i}" for i in range(batch)])
    return dict(
        latents=torch.randn(batch, (h // 2) * (w // 2), tr.config.in_channels, generator=g).to(model.dtype),
        prompt_embeds=text.prompt_embeds, pooled=text.pooled, timestep=torch.full((batch,), 0.5),
        txt_ids=text.text_ids, img_ids=image_ids(h, w, dtype=model.dtype),
        guidance=torch.full((batch,), 3.5) if tr.config.guidance_embeds else None,
    )


def synthetic_step(model, batch: int, ratio: float, mode: str, seed: int = 0) -> SyntheticStep:
    """`batch` sequences, each computing round(ratio * N) random tokens, with a template cache recorded."""
    inputs = synthetic_inputs(model, batch, seed)
    n = inputs["latents"].shape[1]
    computed = max(1, round(ratio * n))
    g = torch.Generator().manual_seed(seed + 17)
    index = [torch.randperm(n, generator=g)[:computed].sort().values for _ in range(batch)]
    shard: dict = {}
    dense_forward(model.transformer, **inputs, mode=mode, record=shard)
    return SyntheticStep(inputs, index, shard, mode)
