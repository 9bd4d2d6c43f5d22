"""Per-step UNet time: stock diffusers forward vs O-caching (masked queries in self-attention), beside the FLOP ideal.

    python -m loadtest.unet_bench --json out/unet_bench.json [--preset sd2-inpaint-bench] [--seconds 1.5]

The mask is a centred rectangle covering `ratio` of the latent grid (a brush stroke, not scattered cells: a
scattered mask max-pools to almost every token at the coarse levels). FLOPs are counted by torch's
FlopCounterMode on the same calls as are timed (attention through SDPA's math backend, which it can see), so the
ideal includes the convolutions, ResNets and cross-attention that O-caching runs in full (the paper: 1.3x for
SD2.1 at m = 0.2). Both variants run interleaved in one process.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from instgenie.engine.models.loader import preset_model
from instgenie.engine.unet.ocache import OCapture, activated, level_masks
from instgenie.engine.unet.step import unet_levels


def box_mask(h: int, w: int, ratio: float) -> torch.Tensor:
    """(h, w) bool: a centred rectangle of about `ratio` of the cells, with the grid's aspect ratio."""
    side = ratio ** 0.5
    bh, bw = max(1, round(h * side)), max(1, round(w * side))
    m = torch.zeros(h, w, dtype=torch.bool)
    m[(h - bh) // 2:(h - bh) // 2 + bh, (w - bw) // 2:(w - bw) // 2 + bw] = True
    return m


def _flops(fn) -> int:
    """FLOPs of one call. Counted with SDPA's math backend: the fused CPU kernel is invisible to FlopCounterMode
    (it would count no attention at all), the math backend's matmuls are counted like any other."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_cell(model, batch: int, ratio: float, seconds: float, min_reps: int = 3) -> dict:
    """`batch` requests with CFG (2 sequences each) at one step, stock vs O-cached."""
    unet = model.transformer
    h, w = (r // model.codec.scale_factor for r in model.info.resolution)
    seqs = 2 * batch
    g = torch.Generator().manual_seed(batch)
    sample = torch.randn(seqs, unet.config.in_channels, h, w, generator=g)
    text = model.text.encode(["", "a photo"] * batch).prompt_embeds
    t = torch.full((seqs,), 500)
    call = dict(encoder_hidden_states=text, return_dict=False)
    record: dict = {}
    with torch.inference_mode(), activated(unet, OCapture(record=record)):
        unet(sample, t, **call)
    caches = [({k: v[s:s + 1] for k, v in record.items()}, 0) for s in range(seqs)]
    keep = level_masks(box_mask(h, w, ratio).expand(seqs, h, w), unet_levels(unet))

    def stock():
        return unet(sample, t, **call)

    def ocache():
        with activated(unet, OCapture(caches=caches, keep=keep, sparse=True)):
            return unet(sample, t, **call)

    variants = {"stock": stock, "o": ocache}
    times = {k: [] for k in variants}
    with torch.inference_mode():
        flops = {k: _flops(fn) for k, fn in variants.items()}  # also the warm-up
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times["stock"]) < min_reps:
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1000)
    computed = int(keep[h * w][0].sum())
    row = {"batch": batch, "ratio": ratio, "latent_cells": h * w, "computed_cells": computed,
           "reps": len(times["stock"]), "stock_gflop": flops["stock"] / 1e9, "o_gflop": flops["o"] / 1e9}
    for name, ts in times.items():
        row[f"{name}_ms"] = statistics.median(ts)
        row[f"{name}_min_ms"] = min(ts)
    row["o_speedup"] = row["stock_ms"] / row["o_ms"]
    row["o_ideal"] = flops["stock"] / flops["o"]
    row["o_efficiency"] = row["o_speedup"] / row["o_ideal"]
    return row


def markdown(rows: list[dict], preset: str) -> str:
    lines = [f"preset {preset}: {rows[0]['latent_cells']} latent cells (finest level); CFG (2 sequences per "
             "request); median ms per UNet call (one denoising step of the batch)", "",
             "| batch | mask ratio | stock ms | O-cache ms | speedup | FLOP-ideal | % of ideal | stock GFLOP | O GFLOP |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['ratio']:.2f} | {r['stock_ms']:.1f} | {r['o_ms']:.1f} "
                     f"| {r['o_speedup']:.2f}x | {r['o_ideal']:.2f}x | {100 * r['o_efficiency']:.0f}% | {r['stock_gflop']:.2f} "
                     f"| {r['o_gflop']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="sd2-inpaint-bench")
    ap.add_argument("--ratios", default="0.1,0.25,0.5")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--seconds", type=float, default=1.5, help="measuring time per cell")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = preset_model(args.preset)
    rows = []
    for batch in map(int, args.batches.split(",")):
        for ratio in map(float, args.ratios.split(",")):
            rows.append(bench_cell(model, batch, ratio, args.seconds))
            print(f"batch {batch} ratio {ratio}: done", file=sys.stderr)
    print(markdown(rows, args.preset))
    result = {"preset": args.preset, "threads": args.threads, "torch": torch.__version__, "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
