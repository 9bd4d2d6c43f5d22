"""Per-step transformer time: stock diffusers forward vs mask-aware KV mode vs Y mode, beside the FLOP ideal.

    python -m loadtest.engine_bench --json out/engine_bench.json [--preset flux-wide] [--seconds 1.5] [--repeats 1]
        [--order steady|interleaved] [--run-length 3] [--cache-copies 4]

All variants run in one process on the same model, taking turns round-robin so machine noise hits each alike;
each cell reports the median (and min) over its calls. `--repeats N` measures each cell N times in a row and
reports the median of the N medians per variant (each repeat's own KV and Y efficiency is kept in the JSON).
Prints a Markdown table and writes JSON.

Order. A serving worker runs the same forward step after step, so by default (`--order steady`) each turn
runs one variant `--run-length` times back to back after one unrecorded call: what is measured is that
variant's steady state, for stock as for KV and Y. `--order interleaved` records one call per turn, each right
after another variant's, whose different weights and activations have evicted the caches (for batch 1 and a
small mask that costs the sparse forward 2-3 ms, the stock one nothing measurable). Consecutive denoising steps
read different steps' caches, so KV and Y calls rotate through `--cache-copies` copies of the step cache.
KV and Y reuse the AdaLN modulation rows of their sequences across calls, as requests at the same step with
the same prompt do (transformer/modulation.py); `kv_cold` / `y_cold` recompute them every call.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from instgenie.engine.flops import FluxShape, ideal_speedup
from instgenie.engine.models.loader import preset_model
from instgenie.engine.transformer.cache_view import StepCache
from instgenie.engine.transformer.reference import dense_forward
from instgenie.engine.transformer.sparse import sparse_forward
from instgenie.engine.transformer.synthetic import synthetic_step


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def cache_copies(st, copies: int) -> list[dict]:
    """The step's cache shard and `copies - 1` clones of it (distinct memory, same values)."""
    return [st.shard] + [{k: v.clone() for k, v in st.shard.items()} for _ in range(copies - 1)]


def _rotating(tr, st, shards: list[dict], shared_modulation: bool):
    """A call of the sparse forward that reads the next of `shards` (copies of the step cache) at each call."""
    packs = itertools.cycle([st.packed(caches=[StepCache(shard, s) for s in range(len(st.index))],
                                       shared_modulation=shared_modulation) for shard in shards])
    return lambda: sparse_forward(tr, next(packs))


def measure(variants: dict, seconds: float, min_reps: int = 3, order: str = "steady",
            run_length: int = 3) -> dict[str, list[float]]:
    """ms per recorded call of each variant, the variants taking turns round-robin (see the module docstring)
    until `seconds` have passed and the first variant has `min_reps` recorded calls."""
    if order not in ("steady", "interleaved"):
        raise ValueError(f"order must be 'steady' or 'interleaved', not {order!r}")
    if run_length < 1:
        raise ValueError("run_length must be at least 1")
    times = {k: [] for k in variants}
    first = next(iter(variants))
    recorded, unrecorded = (run_length, 1) if order == "steady" else (1, 0)
    with torch.inference_mode():
        for fn in variants.values():  # warm-up
            fn()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times[first]) < min_reps:
            for name, fn in variants.items():
                for _ in range(unrecorded):  # the call right after the switch from another variant
                    fn()
                times[name] += [_time(fn) for _ in range(recorded)]
    return times


def bench_cell(model, batch: int, ratio: float, seconds: float, min_reps: int = 3, order: str = "steady",
               run_length: int = 3, copies: int = 4) -> dict:
    if copies < 1:
        raise ValueError("copies must be at least 1")
    tr = model.transformer
    steps = {mode: synthetic_step(model, batch, ratio, mode, seed=batch) for mode in ("kv", "y")}
    inputs = steps["kv"].inputs
    n = inputs["latents"].shape[1]
    computed = int(steps["kv"].index[0].numel())
    variants = {"stock": lambda: dense_forward(tr, **inputs)}
    for mode, st in steps.items():
        shards = cache_copies(st, copies)  # one set per mode, read by its warm and cold variants alike
        variants[mode] = _rotating(tr, st, shards, shared_modulation=True)
        variants[f"{mode}_cold"] = _rotating(tr, st, shards, shared_modulation=False)
    times = measure(variants, seconds, min_reps, order, run_length)
    shape = FluxShape.of(tr)
    text_tokens = inputs["prompt_embeds"].shape[1]
    row = {"batch": batch, "ratio": ratio, "image_tokens": n, "computed_tokens": computed, "text_tokens": text_tokens,
           "reps": len(times["stock"]), "order": order, "run_length": run_length if order == "steady" else 1,
           "cache_copies": copies}
    for name, ts in times.items():
        row[f"{name}_ms"] = statistics.median(ts)
        row[f"{name}_min_ms"] = min(ts)
    for mode in ("kv", "y"):
        for name in (mode, f"{mode}_cold"):
            row[f"{name}_ideal"] = ideal_speedup(shape, n, text_tokens, computed, mode)
    return _derive(row)


def _derive(row: dict) -> dict:
    for name in ("kv", "kv_cold", "y", "y_cold"):
        row[f"{name}_speedup"] = row["stock_ms"] / row[f"{name}_ms"]
        row[f"{name}_efficiency"] = row[f"{name}_speedup"] / row[f"{name}_ideal"]
    return row


def combine(cells: list[dict]) -> dict:
    """One row from repeats of a cell: the median of each variant's median (ms), min of mins, calls summed."""
    row = dict(cells[0])
    for key in cells[0]:
        if key.endswith("_min_ms"):
            row[key] = min(c[key] for c in cells)
        elif key.endswith("_ms"):
            row[key] = statistics.median(c[key] for c in cells)
    row["reps"] = sum(c["reps"] for c in cells)
    row["repeats"] = len(cells)
    row["repeat_kv_efficiency"] = [c["kv_efficiency"] for c in cells]
    row["repeat_y_efficiency"] = [c["y_efficiency"] for c in cells]
    return _derive(row)


def markdown(rows: list[dict], preset: str) -> str:
    r0 = rows[0]
    order = (f"steady order, runs of {r0['run_length']} calls" if r0["order"] == "steady"
             else "interleaved order, one call per turn")
    lines = [f"preset {preset}: {r0['image_tokens']} image tokens, {r0['text_tokens']} text tokens; "
             "median ms per transformer call (one denoising step of the batch); cold = AdaLN modulation recomputed; "
             f"{order}; {r0['cache_copies']} step-cache copies",
             "", "| batch | mask ratio | stock ms | KV ms | KV speedup | KV FLOP-ideal | KV % of ideal | KV cold ms "
             "| KV cold % | Y ms | Y speedup | Y FLOP-ideal | Y % of ideal | Y cold % |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['ratio']:.2f} | {r['stock_ms']:.1f} | {r['kv_ms']:.1f} | {r['kv_speedup']:.2f}x "
            f"| {r['kv_ideal']:.2f}x | {100 * r['kv_efficiency']:.0f}% | {r['kv_cold_ms']:.1f} "
            f"| {100 * r['kv_cold_efficiency']:.0f}% | {r['y_ms']:.1f} | {r['y_speedup']:.2f}x "
            f"| {r['y_ideal']:.2f}x | {100 * r['y_efficiency']:.0f}% | {100 * r['y_cold_efficiency']:.0f}% |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="flux-wide", help="model preset (flux-wide and flux-bench have 1024 image tokens)")
    ap.add_argument("--ratios", default="0.1,0.25,0.5")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--seconds", type=float, default=1.5, help="measuring time per cell")
    ap.add_argument("--repeats", type=int, default=1, help="measure each cell this many times; median of medians")
    ap.add_argument("--order", choices=("steady", "interleaved"), default="steady",
                    help="steady: runs of --run-length calls per variant, as a worker runs them; interleaved: one call")
    ap.add_argument("--run-length", type=int, default=3, help="recorded calls per turn in steady order")
    ap.add_argument("--cache-copies", type=int, default=4, help="copies of the step cache KV/Y calls rotate through")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = preset_model(args.preset)
    rows = []
    for batch in map(int, args.batches.split(",")):
        for ratio in map(float, args.ratios.split(",")):
            cells = []
            for _ in range(args.repeats):
                cells.append(bench_cell(model, batch, ratio, args.seconds, order=args.order,
                                        run_length=args.run_length, copies=args.cache_copies))
                print(f"batch {batch} ratio {ratio}: KV {100 * cells[-1]['kv_efficiency']:.0f}% of ideal",
                      file=sys.stderr, flush=True)
            rows.append(combine(cells))
    print(markdown(rows, args.preset))
    result = {"preset": args.preset, "threads": args.threads, "torch": torch.__version__, "order": args.order,
              "run_length": args.run_length, "cache_copies": args.cache_copies, "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
