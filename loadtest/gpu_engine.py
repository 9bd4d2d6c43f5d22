"""GPU check, part `engine`: stock diffusers forward vs KV vs Y mode per batch and mask ratio, beside the FLOP ideal.

One transformer call = one denoising step of the whole batch. Stock is diffusers' FluxTransformer2DModel.forward
on every token; KV and Y run the packed sparse forward on round(ratio * N) random tokens per sequence against a
template cache recorded once (every sequence of the batch reads the same template: the cache's size, not its
content, sets the cost). Variants are interleaved round-robin and timed with the device synchronised; cells
report the median. Achieved TFLOP/s = analytical FLOPs (engine/flops.py) / time. The modulation rows are
shared across calls: what a request pays at the steps whose rows a miss computed ahead (transformer/
modulation.py, look-ahead: at FLUX.1 size 62 / 30 / 14 / 6 steps at 1 / 2 / 4 / 8 sequences with the default
budget); `*_cold` columns recompute them every call.
"""
from __future__ import annotations

import torch

from instgenie.engine.flops import FluxShape, step_flops
from instgenie.engine.transformer.attention import lse_split_available, varlen_backend
from instgenie.engine.transformer.cache_view import StepCache
from instgenie.engine.transformer.reference import dense_forward
from instgenie.engine.transformer.sparse import PackedStep, sparse_forward

from .gpu_models import CheckConfig, build_transformer, measure, random_index, summary, synthetic_inputs

VARIANTS = ("stock", "kv", "kv_cold", "y", "y_cold")


def _packed(inputs: dict, index, shard: dict, mode: str, shared: bool) -> PackedStep:
    batch = len(index)
    x = inputs["latents"]
    device = x.device
    index = [i.to(device) for i in index]
    return PackedStep(
        x=torch.cat([x[s, idx] for s, idx in enumerate(index)]), token_index=index,
        prompt_embeds=inputs["prompt_embeds"], pooled=inputs["pooled"], timestep=inputs["timestep"],
        txt_ids=inputs["txt_ids"], img_ids=inputs["img_ids"], caches=[StepCache(shard, 0)] * batch, mode=mode,
        guidance=inputs["guidance"], x_full=x if mode == "y" else None,
        cond_keys=[("gpu-check", mode, id(inputs), s) for s in range(batch)] if shared else None,
    )


@torch.no_grad()
def run(cfg: CheckConfig, log=print) -> dict:
    device = torch.device(cfg.device)
    tr = build_transformer(cfg)
    shape = FluxShape.of(tr)
    n, t = cfg.image_tokens, cfg.text_tokens
    log(f"engine: transformer built ({sum(p.numel() for p in tr.parameters()) / 1e9:.2f} B parameters)")
    template = synthetic_inputs(cfg, 1, seed=1)
    shards = {}
    for mode in ("kv", "y"):
        shards[mode] = {}
        dense_forward(tr, **template, mode=mode, record=shards[mode])
    cache_bytes = {mode: sum(v.nbytes for v in shard.values()) for mode, shard in shards.items()}
    rows = []
    for batch in cfg.batches:
        inputs = synthetic_inputs(cfg, batch, seed=2)
        stock_times = None
        for ratio in cfg.ratios:
            index = random_index(n, ratio, batch, seed=batch)
            computed = int(index[0].numel())
            steps = {("kv", True): _packed(inputs, index, shards["kv"], "kv", True),
                     ("kv", False): _packed(inputs, index, shards["kv"], "kv", False),
                     ("y", True): _packed(inputs, index, shards["y"], "y", True),
                     ("y", False): _packed(inputs, index, shards["y"], "y", False)}
            variants = {
                "kv": lambda: sparse_forward(tr, steps["kv", True]),
                "kv_cold": lambda: sparse_forward(tr, steps["kv", False]),
                "y": lambda: sparse_forward(tr, steps["y", True]),
                "y_cold": lambda: sparse_forward(tr, steps["y", False]),
            }
            if stock_times is None:  # stock does not depend on the mask: measured with the batch's first ratio
                variants = {"stock": lambda: dense_forward(tr, **inputs), **variants}
            times = measure(variants, device, cfg.seconds, cfg.min_reps)
            stock_times = times.get("stock", stock_times)
            row = {"batch": batch, "ratio": ratio, "image_tokens": n, "text_tokens": t, "computed_tokens": computed}
            cells = {name: summary(ts) for name, ts in {"stock": stock_times, **times}.items()}
            flops = {"stock": batch * step_flops(shape, n, t)}
            for mode in ("kv", "y"):
                flops[mode] = flops[mode + "_cold"] = batch * step_flops(shape, n, t, computed, mode)
            for name, cell in cells.items():
                row[f"{name}_ms"] = cell["median_ms"]
                row[f"{name}_min_ms"] = cell["min_ms"]
                row[f"{name}_reps"] = cell["reps"]
                row[f"{name}_tflops"] = flops[name] / (cell["median_ms"] / 1e3) / 1e12
            for name in VARIANTS[1:]:
                row[f"{name}_speedup"] = row["stock_ms"] / row[f"{name}_ms"]
                row[f"{name}_ideal"] = flops["stock"] / flops[name]
                row[f"{name}_efficiency"] = row[f"{name}_speedup"] / row[f"{name}_ideal"]
            rows.append(row)
            log(f"engine: batch {batch} ratio {ratio}: stock {row['stock_ms']:.1f} ms, KV {row['kv_ms']:.1f} ms "
                f"({100 * row['kv_efficiency']:.0f}% of ideal), Y {row['y_ms']:.1f} ms")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "attention_backend": varlen_backend(device, cfg.torch_dtype),
        "kv_attention": "split (LSE merge)" if lse_split_available(device, cfg.torch_dtype) else "buffer",
        "parameters": sum(p.numel() for p in tr.parameters()), "cache_bytes_per_step": cache_bytes,
        "peak_memory_gib": peak, "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        f"{result['config']['name']}: {result['rows'][0]['image_tokens']} image + {result['rows'][0]['text_tokens']} "
        f"text tokens, {result['config']['dtype']}, {result['device'].get('gpu', result['device']['device'])}; "
        f"attention {result['attention_backend']}, KV keys {result['kv_attention']}; median ms per transformer call "
        "(one denoising step of the batch)", "",
        "| batch | mask | stock ms | stock TFLOP/s | KV ms | KV speedup | KV ideal | KV % of ideal | KV TFLOP/s "
        "| KV cold % | Y ms | Y speedup | Y ideal | Y % of ideal | Y cold % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['batch']} | {r['ratio']:.2f} | {r['stock_ms']:.1f} | {r['stock_tflops']:.3g} | {r['kv_ms']:.1f} "
            f"| {r['kv_speedup']:.2f}x | {r['kv_ideal']:.2f}x | {100 * r['kv_efficiency']:.0f}% "
            f"| {r['kv_tflops']:.3g} | {100 * r['kv_cold_efficiency']:.0f}% | {r['y_ms']:.1f} | {r['y_speedup']:.2f}x "
            f"| {r['y_ideal']:.2f}x | {100 * r['y_efficiency']:.0f}% | {100 * r['y_cold_efficiency']:.0f}% |")
    return "\n".join(lines)
