"""The GPU check's models: FLUX.1-dev's architecture with random weights made on the device, a tiny CPU twin,
stand-in text encoders and VAE with the right output shapes, synthetic inputs and device-synchronised timing.

No checkpoint and no model hub: the transformer is built from its published configuration (19 dual + 38
single blocks, 24 heads x 128 = hidden 3072, 64 input channels, T5 4096-d sequence, CLIP 768-d pooled,
guidance embedding, RoPE axes 16/56/56) directly on the device in the run dtype, and its linears are drawn
from N(0, 0.02) so activations stay finite through 57 blocks (speed does not depend on the values).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from instgenie.engine.latents import image_ids


@dataclass(frozen=True)
class CheckConfig:
    """Model shape and workload of one GPU-check configuration."""

    name: str
    dual_blocks: int
    single_blocks: int
    heads: int
    head_dim: int
    resolution: int  # pixels, square
    text_tokens: int
    joint_dim: int  # T5 width (encoder_hidden_states)
    pooled_dim: int  # CLIP pooled width
    dtype: str
    device: str
    batches: tuple[int, ...]
    ratios: tuple[float, ...]
    seconds: float  # measuring time per engine cell variant
    min_reps: int
    pipeline_batches: tuple[int, ...]
    pipeline_ratios: tuple[float, ...]
    serving: dict = field(default_factory=dict)

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def image_tokens(self) -> int:
        return (self.resolution // 16) ** 2  # VAE /8, then 2x2 packing

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def as_dict(self) -> dict:
        return asdict(self)


#: FLUX.1-dev's transformer at 1024x1024 (4096 image tokens) with 512 T5 tokens, bf16, on CUDA
FLUX1 = CheckConfig(
    name="flux1-dev-architecture", dual_blocks=19, single_blocks=38, heads=24, head_dim=128, resolution=1024,
    text_tokens=512, joint_dim=4096, pooled_dim=768, dtype="bfloat16", device="cuda",
    batches=(1, 4, 8), ratios=(0.05, 0.1, 0.2, 0.5), seconds=2.0, min_reps=3,
    pipeline_batches=(1, 4), pipeline_ratios=(0.05, 0.1, 0.2, 0.5),
    serving=dict(steps=4, duration=30.0, drain=30.0, templates=2, max_batch_size=8, load=0.8, mode="y",
                 dist="production", capacity_batches=2),
)

#: the same entry point on CPU in seconds (the test suite runs it): same code paths, toy sizes
TINY = CheckConfig(
    name="tiny-cpu", dual_blocks=1, single_blocks=2, heads=2, head_dim=16, resolution=128, text_tokens=8,
    joint_dim=32, pooled_dim=32, dtype="float32", device="cpu",
    batches=(1, 2), ratios=(0.1, 0.5), seconds=0.05, min_reps=2,
    pipeline_batches=(1,), pipeline_ratios=(0.1, 0.5),
    serving=dict(steps=2, duration=2.0, drain=4.0, templates=2, max_batch_size=4, load=0.8, mode="y",
                 dist="production", capacity_batches=2),
)

CONFIGS = {"flux1": FLUX1, "tiny": TINY}


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Flux's three RoPE axes: (16, 56, 56) for head_dim 128."""
    a = (head_dim // 8) // 2 * 2
    b = (head_dim - a) // 2 // 2 * 2
    return a, b, head_dim - a - b


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def build_transformer(cfg: CheckConfig, seed: int = 0):
    """FluxTransformer2DModel of `cfg`'s shape, created on the device in the run dtype (no fp32 copy on the way)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    with _default_dtype(cfg.torch_dtype), torch.device(cfg.device):
        tr = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=cfg.dual_blocks, num_single_layers=cfg.single_blocks,
            attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads, joint_attention_dim=cfg.joint_dim,
            pooled_projection_dim=cfg.pooled_dim, guidance_embeds=True, axes_dims_rope=rope_axes(cfg.head_dim),
        )
    for module in tr.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.normal_(0.0, 0.02)
            if module.bias is not None:
                module.bias.zero_()
    return tr.eval()


def config_hash(cfg: CheckConfig, seed: int) -> str:
    """Stands for the weights' fingerprint: the weights are a function of (config, seed, dtype), and hashing
    24 GB of device memory would cost more than the check itself."""
    return hashlib.sha256(json.dumps([cfg.as_dict(), seed], sort_keys=True, default=str).encode()).hexdigest()


def synthetic_inputs(cfg: CheckConfig, batch: int, seed: int = 0) -> dict:
    """dense_forward keyword arguments for `batch` sequences of random latents and text embeddings."""
    g = torch.Generator().manual_seed(seed)
    side = cfg.resolution // 8
    device, dtype = torch.device(cfg.device), cfg.torch_dtype

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    return dict(
        latents=randn(batch, cfg.image_tokens, 64), prompt_embeds=randn(batch, cfg.text_tokens, cfg.joint_dim),
        pooled=randn(batch, cfg.pooled_dim), timestep=torch.full((batch,), 0.5, device=device),
        txt_ids=torch.zeros(cfg.text_tokens, 3, device=device, dtype=dtype),
        img_ids=image_ids(side, side, device, dtype), guidance=torch.full((batch,), 3.5, device=device),
    )


def random_index(n: int, ratio: float, batch: int, seed: int) -> list[torch.Tensor]:
    """Per sequence, round(ratio * n) random token positions (sorted)."""
    g = torch.Generator().manual_seed(seed)
    m = max(1, round(ratio * n))
    return [torch.randperm(n, generator=g)[:m].sort().values for _ in range(batch)]


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device) -> float:
    """Wall time of fn() in ms, the device's queued work included (synchronised before and after)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3


def measure(variants: dict, device, seconds: float, min_reps: int) -> dict[str, list[float]]:
    """Interleaved timing: one warm-up each, then rounds over all variants until `seconds` and `min_reps`."""
    times = {name: [] for name in variants}
    for fn in variants.values():
        fn()
    deadline = time.perf_counter() + seconds * len(variants)
    while time.perf_counter() < deadline or min(len(t) for t in times.values()) < min_reps:
        for name, fn in variants.items():
            times[name].append(timed_ms(fn, device))
    return times


def summary(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "reps": len(times)}


def device_info(device: str) -> dict:
    """What ran the check: torch build, accelerator, host."""
    info = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "python": platform.python_version(),
            "host": platform.node(), "cpu_threads": torch.get_num_threads(), "device": device,
            "cuda_available": torch.cuda.is_available()}
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
    return info
