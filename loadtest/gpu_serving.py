"""GPU check, part `serving`: a short Poisson replay, stock diffusers inpainting with static batching vs ours.

The model is FLUX.1-dev's transformer (random weights, gpu_models.py) inside a real diffusers
FluxInpaintPipeline whose text encoders and VAE are small stand-ins with the right output shapes: a 2-layer
CLIP with a 768-d pooled output, a 2-layer T5 with 4096-d token embeddings (512 tokens), and a narrow VAE with
16 latent channels and an 8x downscale. Their cost is negligible next to the transformer's, so the replay
measures what the paper measures: transformer work, batching and cache handling. Both systems serve the same
trace on the same model and templates (loadtest/systems.py): (a) diffusers-static, the stock pipeline with
request-level static batching; (d) ours, step-level continuous batching with mask-aware caching. The rate is
`load` x (a)'s closed-burst capacity, measured first.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from instgenie.engine.cache_provider import HostTierProvider
from instgenie.engine.editor import Editor
from instgenie.engine.template_cache import DirectoryBlobStore, TemplateStore
from instgenie.engine.tiers.host_cache import HostCache

from .gpu_models import CheckConfig, build_transformer, config_hash
from .serving_bench import replay, saturate, warm_up
from .systems import SYSTEMS, TEMPLATE_PHOTOS, build_systems, template_images
from .trace import burst, poisson_trace

def stand_ins(cfg: CheckConfig) -> str:
    return (f"text encoders: 2-layer CLIP (pooled {cfg.pooled_dim}-d) and 2-layer T5 ({cfg.joint_dim}-d x "
            f"{cfg.text_tokens} tokens), random weights, byte-level tokenizers built in memory; VAE: 4-level "
            "AutoencoderKL with 8-32 channels, 16 latent channels, 8x downscale, random weights")


@torch.no_grad()
def build_edit_model(cfg: CheckConfig, steps: int, seed: int = 0):
    """An EditModel around a real FluxInpaintPipeline: the check's transformer plus small stand-ins."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxInpaintPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from instgenie.engine.models.base import ModelInfo
    from instgenie.engine.models.flux import FluxTextEncoder, VaeCodec, _byte_level_tokenizers
    from instgenie.engine.models.loader import EditModel, _quiet_libraries

    _quiet_libraries()
    transformer = build_transformer(cfg, seed)
    torch.manual_seed(seed)
    clip_tok, t5_tok = _byte_level_tokenizers()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=cfg.pooled_dim, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=cfg.pooled_dim,
        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=cfg.joint_dim, d_kv=8, d_ff=64, num_layers=2,
                                 num_heads=4, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 32, 32),
                        latent_channels=16, layers_per_block=1, norm_num_groups=8, sample_size=cfg.resolution,
                        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    for module in (clip, t5, vae):
        module.to(cfg.device, cfg.torch_dtype).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                                                max_shift=1.15, use_dynamic_shifting=True)
    pipe = FluxInpaintPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok,
                               text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    info = ModelInfo(model_id=f"{cfg.name}-seed{seed}", family="flux", resolution=(cfg.resolution, cfg.resolution),
                     default_steps=steps, guidance="distilled", default_guidance_scale=3.5,
                     config_hash=config_hash(cfg, seed), extra={"text_tokens": cfg.text_tokens})
    return EditModel(transformer, scheduler, FluxTextEncoder(pipe, cfg.text_tokens), VaeCodec(vae), info, pipe)


def _row(name: str, row: dict) -> dict:
    keep = ("offered", "completed", "failed", "unfinished", "throughput_rps", "latency_mean", "latency_p95",
            "queue_mean", "queue_p95", "mean_token_ratio", "errors")
    return {"system": name, **{k: row.get(k) for k in keep}, "mean_batch_size": row["stats"].get("mean_batch_size"),
            "steps": row["stats"].get("steps")}


def run(cfg: CheckConfig, store_dir: Path, log=print) -> dict:
    sv = cfg.serving
    steps, templates = sv["steps"], sv["templates"]
    t0 = time.monotonic()
    model = build_edit_model(cfg, steps)
    store = TemplateStore(DirectoryBlobStore(store_dir))
    # As the worker serves: a host-memory tier (page-locked on CUDA) in front of the store, every step shard
    # of every template fitting in it; each step's shard goes to the device with an asynchronous copy.
    element = torch.tensor([], dtype=cfg.torch_dtype).element_size()
    step_bytes = (2 if sv["mode"] == "kv" else 1) * model.num_blocks * cfg.image_tokens * cfg.hidden * element
    host = HostCache(int(1.25 * templates * steps * step_bytes) + 2**26, name="gpu-check-host")
    try:
        return _serve(cfg, model, Editor(model, store, cache=HostTierProvider(store, host)), log, t0)
    finally:
        host.close()


def _serve(cfg: CheckConfig, model, editor: Editor, log, t0: float) -> dict:
    sv = cfg.serving
    steps, templates, batch = sv["steps"], sv["templates"], sv["max_batch_size"]
    resolution = (cfg.resolution, cfg.resolution)
    shape = dict(resolution=resolution, cell=model.codec.scale_factor * 2, templates=templates)
    images = template_images(resolution)[:templates]
    build_s = time.monotonic() - t0
    t0 = time.monotonic()
    ids = [editor.register_template(img, f"a photo: {name}", steps=steps, seed=i, mode=sv["mode"]).template_id
           for i, (img, name) in enumerate(zip(images, TEMPLATE_PHOTOS))]
    register_s = time.monotonic() - t0
    log(f"serving: model built in {build_s:.1f} s, {templates} templates registered in {register_s:.1f} s")
    systems = build_systems(["a", "d"], model, editor, images, ids, steps, burst(0, 0, **shape), batch)
    timeout = max(120.0, 10 * sv["duration"])
    warm = burst(batch, 999, sv["dist"], **shape)
    for i, r in enumerate(warm.requests):
        r.template = i % templates  # every template's cache loaded once before anything is measured
    for system in systems.values():
        warm_up(system, warm, timeout)
    capacity_trace = burst(sv["capacity_batches"] * batch, 100, sv["dist"], **shape)
    capacity = {key: saturate(system, capacity_trace, batch, timeout) for key, system in systems.items()}
    rate = sv["load"] * capacity["a"]["throughput_rps"]
    log(f"serving: capacity a {capacity['a']['throughput_rps']:.3f} req/s, d {capacity['d']['throughput_rps']:.3f} "
        f"req/s; replaying at {rate:.3f} req/s")
    trace = poisson_trace(rate, sv["duration"], 1000, sv["dist"], **shape)
    runs = {key: replay(system, trace, sv["drain"]) for key, system in systems.items()}
    a, d = runs["a"], runs["d"]
    return {
        "stand_ins": stand_ins(cfg), "steps": steps, "templates": templates, "cache_mode": sv["mode"],
        "cache_tier": "host tier (page-locked on CUDA) holding every step shard; one copy per step to the device",
        "max_batch_size": batch, "load": sv["load"], "rate_rps": rate, "duration_s": sv["duration"],
        "offered": len(trace.requests), "build_seconds": build_s, "register_seconds": register_s,
        "capacity": {SYSTEMS[k]: _row(SYSTEMS[k], v) for k, v in capacity.items()},
        "runs": [_row(SYSTEMS[k], v) for k, v in runs.items()],
        "latency_mean_speedup": (a["latency_mean"] / d["latency_mean"]) if a["latency_mean"] and d["latency_mean"]
        else None,
        "capacity_ratio": capacity["d"]["throughput_rps"] / capacity["a"]["throughput_rps"]
        if capacity["a"]["throughput_rps"] else None,
    }


def _f(value, fmt=".2f"):
    return "-" if value is None else format(value, fmt)


def markdown(result: dict) -> str:
    lines = [f"{result['config']['name']}, {result['steps']} steps, cache mode {result['cache_mode']}, "
             f"max batch {result['max_batch_size']}, Poisson {result['rate_rps']:.3f} req/s for "
             f"{result['duration_s']:g} s (load {result['load']:g} x diffusers' capacity); stand-ins: "
             f"{result['stand_ins']}", "",
             "| system | capacity req/s | offered | completed | unfinished | throughput req/s | mean latency s "
             "| p95 latency s | mean queue s | mean batch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        cap = result["capacity"][r["system"]]["throughput_rps"]
        lines.append(f"| {r['system']} | {_f(cap, '.3f')} | {r['offered']} | {r['completed']} | {r['unfinished']} "
                     f"| {_f(r['throughput_rps'], '.3f')} | {_f(r['latency_mean'])} | {_f(r['latency_p95'])} "
                     f"| {_f(r['queue_mean'])} | {_f(r['mean_batch_size'], '.1f')} |")
    lines += ["", f"mean latency, diffusers / ours: {_f(result['latency_mean_speedup'])}x; capacity, ours / diffusers: "
              f"{_f(result['capacity_ratio'])}x"]
    return "\n".join(lines)
