"""Cache streaming benchmark: one denoising step with its cache (i) resident, (ii) loaded then computed,
(iii) pipelined block by block, (iv) pipelined with the load/recompute planner -- beside a full recompute.

    python -m loadtest.pipeline_bench --json out/pipeline_bench.json [--preset flux-bench] [--batch 2]

Y mode (the planner needs it). The link to the device is modelled on CPU (BlockLoader sleeps bytes/bandwidth
after a real copy); bandwidths are set so that loading the step's cache takes `--load-factors` times the
step's resident compute. Targets: (iv) <= 1.1 x max(compute, load) and never slower than full recompute.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from instgenie.engine.models.loader import preset_model
from instgenie.engine.pipeline import BandwidthModel, BlockCosts, PipelineConfig, StreamedCache, open_loader, plan_step
from instgenie.engine.pipeline import sequential_load
from instgenie.engine.transformer.reference import dense_forward
from instgenie.engine.transformer.sparse import sparse_forward
from instgenie.engine.transformer.synthetic import synthetic_step


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _streamed(model, st, config: PipelineConfig, use_cache: list[bool]) -> float:
    loader = open_loader(config, [st.shard], model.num_blocks, use_cache)
    caches = [StreamedCache(loader, 0, s) for s in range(len(st.index))]
    try:
        sparse_forward(model.transformer, st.packed(caches=caches, use_cache=use_cache))
    finally:
        loader.close()
    return loader.report().overlap_ratio


def bench_cell(model, costs: BlockCosts, batch: int, ratio: float, load_factor: float, repeats: int) -> dict:
    tr, n_blocks = model.transformer, model.num_blocks
    st = synthetic_step(model, batch, ratio, "y", seed=5)
    all_cache = [True] * n_blocks
    resident = _median_seconds(lambda: sparse_forward(tr, st.packed()), repeats)
    full = _median_seconds(lambda: dense_forward(tr, **st.inputs), repeats)
    total_bytes = sum(t.nbytes for t in st.shard.values())
    bandwidth = BandwidthModel(total_bytes / (load_factor * resident))
    config = PipelineConfig(bandwidth=bandwidth, costs=costs)
    load = bandwidth.seconds(total_bytes)
    sequential = _median_seconds(
        lambda: (sequential_load(config, [st.shard], n_blocks), sparse_forward(tr, st.packed())), repeats)
    overlap = []
    pipelined = _median_seconds(lambda: overlap.append(_streamed(model, st, config, all_cache)), repeats)
    computed = sum(int(i.numel()) for i in st.index)
    plan = plan_step(config, "y", [st.shard], n_blocks, computed, batch * st.inputs["latents"].shape[1])
    planned = _median_seconds(lambda: _streamed(model, st, config, plan.use_cache), repeats)
    bound = max(resident, load)
    return {
        "batch": batch, "ratio": ratio, "load_factor": load_factor, "bytes": total_bytes,
        "bandwidth_MBps": bandwidth.bytes_per_second / 1e6, "resident_ms": resident * 1e3, "load_ms": load * 1e3,
        "sequential_ms": sequential * 1e3, "pipelined_ms": pipelined * 1e3, "planned_ms": planned * 1e3,
        "full_recompute_ms": full * 1e3, "bound_ms": bound * 1e3, "planned_over_bound": planned / bound,
        "planned_vs_full": planned / full, "blocks_recomputed": plan.n_full, "blocks": n_blocks,
        "pipelined_overlap": statistics.median(overlap),
    }


def markdown(rows: list[dict], preset: str) -> str:
    lines = [f"preset {preset}, Y mode, one denoising step, median ms", "",
             "| batch | mask | load/compute | resident (i) | sequential (ii) | pipelined (iii) | + planner (iv) "
             "| full recompute | max(compute, load) | (iv) / max | blocks recomputed |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['ratio']:.2f} | {r['load_factor']:.1f} | {r['resident_ms']:.1f} "
            f"| {r['sequential_ms']:.1f} | {r['pipelined_ms']:.1f} | {r['planned_ms']:.1f} "
            f"| {r['full_recompute_ms']:.1f} | {r['bound_ms']:.1f} | {r['planned_over_bound']:.2f} "
            f"| {r['blocks_recomputed']}/{r['blocks']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="flux-bench")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--ratios", default="0.1,0.25,0.5")
    ap.add_argument("--load-factors", default="0.5,1,2,4")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = preset_model(args.preset)
    costs = BlockCosts.calibrate(model, batch=args.batch)
    print(f"calibrated block costs: {costs}", file=sys.stderr)
    rows = []
    with torch.inference_mode():
        for ratio in map(float, args.ratios.split(",")):
            for factor in map(float, args.load_factors.split(",")):
                rows.append(bench_cell(model, costs, args.batch, ratio, factor, args.repeats))
                print(f"ratio {ratio} load x{factor}: done", file=sys.stderr)
    print(markdown(rows, args.preset))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"preset": args.preset, "costs": vars(costs), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
