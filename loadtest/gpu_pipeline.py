"""GPU check, part `pipeline`: streaming a step's cache from pinned host memory while the transformer computes.

Per (mode, batch, mask ratio), one denoising step with its cache (i) resident on the device, (ii) copied block by
block first and computed after, (iii) pipelined block by block (BlockLoader: side stream, CUDA events, double
buffers), (iv) pipelined with the load/recompute planner (Algorithm 1; Y mode only), beside a full recompute.
Every sequence streams its own copy of the template's step shard (as requests on different templates would).
On CUDA the copies are real host->device copies from page-locked memory and the link bandwidth is measured;
on CPU the link is modelled (the copy is real, then the loader sleeps out `bytes / bandwidth` with the
bandwidth set so loading takes as long as computing), which is what the test suite exercises.
"""
from __future__ import annotations

import statistics

import torch

from instgenie.engine.pipeline import BandwidthModel, BlockCosts, PipelineConfig, StreamedCache, open_loader
from instgenie.engine.pipeline import plan_step, sequential_load
from instgenie.engine.tiers.host_cache import pin_tensors
from instgenie.engine.transformer.cache_view import StepCache
from instgenie.engine.transformer.reference import dense_forward
from instgenie.engine.transformer.sparse import PackedStep, sparse_forward

from .gpu_models import CheckConfig, build_transformer, random_index, sync, synthetic_inputs, timed_ms


def link_bandwidth(device: torch.device, nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of a pinned host -> device copy (median of `repeats`)."""
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(repeats + 1):
        times.append(timed_ms(lambda: dst.copy_(src, non_blocking=True), device) / 1e3)
    return nbytes / statistics.median(times[1:])


def _step(inputs, index, caches, mode, use_cache=None) -> PackedStep:
    x = inputs["latents"]
    return PackedStep(
        x=torch.cat([x[s, idx] for s, idx in enumerate(index)]), token_index=index,
        prompt_embeds=inputs["prompt_embeds"], pooled=inputs["pooled"], timestep=inputs["timestep"],
        txt_ids=inputs["txt_ids"], img_ids=inputs["img_ids"], caches=caches, mode=mode,
        guidance=inputs["guidance"], x_full=x if mode == "y" else None, use_cache=use_cache,
        cond_keys=[("gpu-pipeline", id(inputs), s) for s in range(len(index))],
    )


def _median_ms(fn, device, repeats: int) -> float:
    fn()
    return statistics.median(timed_ms(fn, device) for _ in range(repeats))


@torch.no_grad()
def run(cfg: CheckConfig, log=print, repeats: int = 3) -> dict:
    device = torch.device(cfg.device)
    cuda = device.type == "cuda"
    tr = build_transformer(cfg)
    n_blocks = cfg.dual_blocks + cfg.single_blocks
    n = cfg.image_tokens
    link = link_bandwidth(device) if cuda else None
    template = synthetic_inputs(cfg, 1, seed=1)
    rows, costs = [], None
    for mode in ("y", "kv"):
        shard = {}
        dense_forward(tr, **template, mode=mode, record=shard)
        host = pin_tensors({k: v.cpu() for k, v in shard.items()}) if cuda else shard
        if mode == "y":  # the planner's per-block costs, measured on this device
            calib = synthetic_inputs(cfg, 2, seed=3)
            cells = []
            for ratio in (0.1, 0.5):
                index = [i.to(device) for i in random_index(n, ratio, 2, seed=7)]
                cells.append((lambda use_cache, index=index: _step(calib, index, [StepCache(shard, 0)] * 2, "y",
                                                                    use_cache), index, n))
            costs = BlockCosts.measure(tr, cells, repeats=2)
            log(f"pipeline: block costs {costs}")
        for batch in cfg.pipeline_batches:
            inputs = synthetic_inputs(cfg, batch, seed=2)
            full_ms = _median_ms(lambda: dense_forward(tr, **inputs), device, repeats)
            shards = [host] * batch
            step_bytes = batch * sum(t.nbytes for t in host.values())
            for ratio in cfg.pipeline_ratios:
                index = [i.to(device) for i in random_index(n, ratio, batch, seed=batch)]
                resident_step = _step(inputs, index, [StepCache(shard, 0)] * batch, mode)
                resident = _median_ms(lambda: sparse_forward(tr, resident_step), device, repeats)
                # CPU: a modelled link as fast as compute; CUDA: the measured one (timing = real copies).
                bandwidth = BandwidthModel(link if cuda else step_bytes / (resident / 1e3))
                config = PipelineConfig(bandwidth=None if cuda else bandwidth, costs=costs, device=str(device),
                                        copy_on_cpu=True)
                planner_config = PipelineConfig(bandwidth=bandwidth, costs=costs, device=str(device))
                sequential = _median_ms(lambda: (sequential_load(config, shards, n_blocks),
                                                 sparse_forward(tr, resident_step)), device, repeats)
                overlap = []

                def streamed(use_cache):
                    loader = open_loader(config, shards, n_blocks, use_cache)
                    caches = [StreamedCache(loader, s, 0) for s in range(batch)]
                    try:
                        sparse_forward(tr, _step(inputs, index, caches, mode, use_cache if mode == "y" else None))
                        sync(device)
                    finally:
                        loader.close()
                    overlap.append(loader.report().overlap_ratio)

                pipelined = _median_ms(lambda: streamed([True] * n_blocks), device, repeats)
                pipelined_overlap = statistics.median(overlap)
                plan = plan_step(planner_config, mode, shards, n_blocks, sum(int(i.numel()) for i in index),
                                 batch * n) if mode == "y" else None
                planned = _median_ms(lambda: streamed(plan.use_cache), device, repeats) if plan else None
                load_ms = bandwidth.seconds(step_bytes) * 1e3
                bound = max(resident, load_ms)
                rows.append({
                    "mode": mode, "batch": batch, "ratio": ratio, "bytes": step_bytes,
                    "link_GBps": bandwidth.bytes_per_second / 1e9, "load_ms": load_ms, "resident_ms": resident,
                    "sequential_ms": sequential, "pipelined_ms": pipelined, "planned_ms": planned,
                    "full_recompute_ms": full_ms, "bound_ms": bound, "pipelined_over_bound": pipelined / bound,
                    "planned_over_bound": planned / bound if planned else None,
                    "blocks_recomputed": plan.n_full if plan else 0, "blocks": n_blocks,
                    "pipelined_overlap": pipelined_overlap,
                })
                log(f"pipeline: {mode} batch {batch} ratio {ratio}: resident {resident:.1f} ms, load {load_ms:.1f} ms, "
                    f"sequential {sequential:.1f}, pipelined {pipelined:.1f}, planned {planned or float('nan'):.1f}")
    return {
        "link": "measured: pinned host -> device copy" if cuda else "modelled: load time = resident compute time",
        "link_GBps": link / 1e9 if link else None, "costs": vars(costs) if costs else None, "rows": rows,
    }


def markdown(result: dict) -> str:
    link = f"{result['link_GBps']:.1f} GB/s" if result["link_GBps"] else "modelled"
    lines = [f"{result['config']['name']}, one denoising step, median ms; link {result['link']} ({link})", "",
             "| mode | batch | mask | GB per step | load | resident (i) | sequential (ii) | pipelined (iii) "
             "| + planner (iv) | full recompute | (iii) / max(compute, load) | overlap | blocks recomputed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        planned = f"{r['planned_ms']:.1f}" if r["planned_ms"] is not None else "-"
        lines.append(
            f"| {r['mode']} | {r['batch']} | {r['ratio']:.2f} | {r['bytes'] / 1e9:.2f} | {r['load_ms']:.1f} "
            f"| {r['resident_ms']:.1f} | {r['sequential_ms']:.1f} | {r['pipelined_ms']:.1f} | {planned} "
            f"| {r['full_recompute_ms']:.1f} | {r['pipelined_over_bound']:.2f} | {r['pipelined_overlap']:.2f} "
            f"| {r['blocks_recomputed']}/{r['blocks']} |")
    return "\n".join(lines)
