"""Serving benchmark: Poisson traces against the diffusers baseline and our engine with features switched off.

    python -m loadtest.serving_bench --json out/serving.json --md out/serving.md --plots out/ \\
        [--preset flux-small] [--steps 8] [--duration 15] [--seed 0] [--loads 0.4,0.6,0.8,1.0] \\
        [--dists production,public] [--systems a,b,c,d]

Systems (loadtest/systems.py): a diffusers-static, b ours-cb-nocache, c ours-static-cache, d ours. All run in this
process, one at a time, on the same model and the same registered templates.

Method.
  1. Warm-up: every system serves one batch of max_batch_size requests (all templates), not measured.
  2. Max sustainable throughput, per (system, mask distribution): a closed burst of N = burst_batches x
     max_batch_size requests submitted at once, repeated --capacity-rounds times (interleaved), averaged. With
     t_k the k-th completion time, the steady-state rate is (N - B) / (t_N - t_B), B = max_batch_size: the
     first batch's completions are left out because they include the pipeline fill (nobody had finished yet),
     after which the system is never starved until the end.
  3. Poisson replays at rate = load x (a)'s max throughput for that distribution (the first listed system's if
     a is not run). Every system replays the very same trace of a cell (same seed); cells are run load by load,
     distribution by distribution, with the system order rotated per cell, so machine noise is spread evenly.
     Arrivals stop at --duration; the replay then waits at most --drain seconds; requests still unfinished are
     counted as such (their latency is unknown, so latency statistics cover completed requests only).
     Throughput = completed / (last completion - replay start).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from instgenie.engine.editor import Editor
from instgenie.engine.models.loader import preset_model
from instgenie.engine.template_cache import DirectoryBlobStore, TemplateStore

from . import report
from .systems import SYSTEMS, System, Ticket, build_systems, register_templates, template_images
from .trace import MASK_DISTRIBUTIONS, Trace, burst, poisson_trace


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarise(tickets: list[Ticket], start: float) -> dict:
    """Counts and latency/queueing statistics of one run's tickets (called after the drain deadline)."""
    done = [t for t in tickets if t.future.done() and not t.future.cancelled() and t.future.exception() is None]
    failed = [t for t in tickets if t.future.done() and (t.future.cancelled() or t.future.exception() is not None)]
    latencies = [t.latency_seconds for t in done if t.latency_seconds is not None]
    queues = [t.queue_seconds for t in done if t.queue_seconds is not None]
    last = max((t.finished for t in done), default=None)
    return {
        "offered": len(tickets), "completed": len(done), "failed": len(failed),
        "unfinished": len(tickets) - len(done) - len(failed),
        "errors": sorted({repr(t.future.exception())[:200] for t in failed if not t.future.cancelled()})[:5],
        "throughput_rps": len(done) / (last - start) if done and last > start else 0.0,
        "latency_mean": _mean(latencies), "latency_p95": _pct(latencies, 95),
        "queue_mean": _mean(queues), "queue_p95": _pct(queues, 95),
        "mean_token_ratio": float(np.mean([t.request.token_ratio for t in tickets])) if tickets else 0.0,
    }


def replay(system: System, trace: Trace, drain: float) -> dict:
    """Submit each request at its arrival time, stop at the trace's duration, wait at most `drain` more."""
    system.start()
    tickets: list[Ticket] = []
    lags = []
    try:
        start = time.monotonic()
        for req in trace.requests:
            target = start + req.arrival
            delay = target - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            lags.append(time.monotonic() - target)  # how late the client was: should stay ~0
            tickets.append(system.submit(req))
        deadline = start + trace.duration + drain
        cf.wait([t.future for t in tickets], timeout=max(0.0, deadline - time.monotonic()))
        row = summarise(tickets, start)
        row["stats"] = system.stats()
        row["max_submit_lag_s"] = max(lags, default=0.0)
    finally:
        system.stop()
    return row


def saturate(system: System, trace: Trace, batch: int, timeout: float) -> dict:
    """Closed burst: everything submitted at once; steady-state completion rate after the first batch."""
    system.start()
    try:
        start = time.monotonic()
        tickets = [system.submit(r) for r in trace.requests]
        cf.wait([t.future for t in tickets], timeout=timeout)
        row = summarise(tickets, start)
        row["stats"] = system.stats()
    finally:
        system.stop()
    ends = sorted(t.finished for t in tickets if t.finished is not None and t.future.done()
                  and not t.future.cancelled() and t.future.exception() is None)
    if len(ends) > batch and ends[-1] > ends[batch - 1]:
        row["throughput_rps"] = (len(ends) - batch) / (ends[-1] - ends[batch - 1])
        row["method"] = "steady"
    else:  # too few completions for the steady-state window: plain completions / elapsed
        row["method"] = "overall"
    row["seconds"] = (ends[-1] - start) if ends else None
    return row


def merge_rounds(rounds: list[dict]) -> dict:
    """One (system, distribution) capacity from its burst rounds: the mean rate, with the spread kept."""
    rates = [r["throughput_rps"] for r in rounds]
    batches = [r["stats"]["mean_batch_size"] for r in rounds if r["stats"].get("mean_batch_size") is not None]
    return {
        "throughput_rps": float(np.mean(rates)), "throughput_min": min(rates), "throughput_max": max(rates),
        "offered": sum(r["offered"] for r in rounds), "completed": sum(r["completed"] for r in rounds),
        "failed": sum(r["failed"] for r in rounds), "unfinished": sum(r["unfinished"] for r in rounds),
        "stats": {**rounds[-1]["stats"], "mean_batch_size": float(np.mean(batches)) if batches else None},
        "rounds": rounds,
    }


def measure_capacity(systems: dict[str, System], args, shape: dict, bar, timeout: float) -> list[dict]:
    """Closed-burst capacity of every (system, distribution), rounds interleaved so noise hits all alike."""
    B = args.max_batch_size
    rounds: dict[tuple[str, str], list[dict]] = {}
    for rnd in range(args.capacity_rounds):
        for di, dist in enumerate(args.dists):
            trace = burst(args.burst_batches * B, args.seed + 100 + 10 * rnd + di, dist, **shape)
            for key, system in systems.items():
                bar.set_postfix_str(f"capacity {system.name} {dist} round {rnd + 1}")
                rounds.setdefault((key, dist), []).append(saturate(system, trace, B, timeout))
                bar.update()
    return [{"system": systems[key].name, "key": key, "dist": dist, **merge_rounds(rows)}
            for (key, dist), rows in rounds.items()]


def warm_up(system: System, trace: Trace, timeout: float) -> None:
    system.start()
    try:
        cf.wait([system.submit(r).future for r in trace.requests], timeout=timeout)
    finally:
        system.stop()


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="write the full result here")
    ap.add_argument("--md", default=None, help="write the Markdown report here")
    ap.add_argument("--plots", default=None, help="directory for the PNG plots")
    ap.add_argument("--preset", default="flux-small")
    ap.add_argument("--models", default=None, help="preset root (default: $INSTGENIE_MODELS or var/models)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of Poisson arrivals per replay "
                    "(15 keeps the default run of flux-small under ~15 min on 2 cores)")
    ap.add_argument("--drain", type=float, default=None, help="max seconds to wait after arrivals end "
                    "(default: half the duration, at least 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--loads", default="0.4,0.6,0.8,1.0", help="fractions of (a)'s max throughput")
    ap.add_argument("--dists", default="production,public")
    ap.add_argument("--systems", default="a,b,c,d", help=", ".join(f"{k}={v}" for k, v in SYSTEMS.items()))
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--burst-batches", type=int, default=4, help="closed burst size, in batches")
    ap.add_argument("--capacity-rounds", type=int, default=2,
                    help="closed bursts per (system, distribution); the capacity is their mean")
    ap.add_argument("--templates", type=int, default=4, help="how many template photos (at most 4)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--store", default=None, help="template cache directory (default: a temporary one)")
    args = ap.parse_args(argv)
    args.loads = [float(x) for x in args.loads.split(",") if x]
    args.dists = [d for d in args.dists.split(",") if d]
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.drain = max(5.0, args.duration / 2) if args.drain is None else args.drain
    for d in args.dists:
        if d not in MASK_DISTRIBUTIONS:
            ap.error(f"unknown distribution {d!r}; choose from {sorted(MASK_DISTRIBUTIONS)}")
    for s in args.systems:
        if s not in SYSTEMS:
            ap.error(f"unknown system {s!r}; choose from {sorted(SYSTEMS)}")
    if args.capacity_rounds < 1:
        ap.error("--capacity-rounds must be at least 1")
    if not 1 <= args.templates <= 4:
        ap.error("--templates must be within [1, 4]")
    return args


def run(args, store_dir: Path) -> dict:
    torch.set_num_threads(args.threads)
    kwargs = {} if args.models is None else {"root": args.models}
    model = preset_model(args.preset, **kwargs)
    res = tuple(model.info.resolution)
    cell = model.codec.scale_factor * 2  # one Flux token = 2x2 latent cells
    shape = dict(resolution=res, cell=cell, templates=args.templates)
    editor = Editor(model, TemplateStore(DirectoryBlobStore(store_dir)), resident_templates=args.templates)
    images = template_images(res)[: args.templates]
    t0 = time.monotonic()
    print(f"registering {len(images)} templates ({args.steps} steps each)...", file=sys.stderr)
    template_ids = register_templates(editor, images, args.steps)
    register_seconds = time.monotonic() - t0
    B = args.max_batch_size
    systems = build_systems(args.systems, model, editor, images, template_ids, args.steps,
                            burst(0, 0, **shape), B)
    n_runs = len(systems) * (1 + len(args.dists) * (args.capacity_rounds + len(args.loads)))
    bar = tqdm(total=n_runs, desc="serving bench", file=sys.stderr, unit="run")
    burst_timeout = max(120.0, 4 * args.duration)  # a bound, not a measurement: generous

    warm = burst(B, args.seed + 999, args.dists[0], **shape)
    for i, r in enumerate(warm.requests):
        r.template = i % args.templates  # load every template's cache once
    for key, system in systems.items():
        bar.set_postfix_str(f"warm-up {system.name}")
        warm_up(system, warm, burst_timeout)
        bar.update()

    capacity = measure_capacity(systems, args, shape, bar, burst_timeout)
    ref = "a" if "a" in systems else args.systems[0]
    ref_cap = {c["dist"]: c["throughput_rps"] for c in capacity if c["key"] == ref}

    runs = []
    keys = list(systems)
    cell_index = 0
    for load in args.loads:
        for di, dist in enumerate(args.dists):
            rate = load * ref_cap[dist]
            if not rate > 0:  # the reference system completed nothing in its burst: no rate to replay at
                print(f"skipping {dist} load {load}: {SYSTEMS[ref]} has no measured capacity", file=sys.stderr)
                bar.update(len(keys))
                cell_index += 1
                continue
            trace = poisson_trace(rate, args.duration, args.seed + 1000 * (cell_index + 1), dist, **shape)
            order = keys[cell_index % len(keys):] + keys[: cell_index % len(keys)]  # rotate who goes first
            for key in order:
                system = systems[key]
                bar.set_postfix_str(f"{system.name} {dist} load {load:.0%} ({rate:.2f}/s)")
                row = replay(system, trace, args.drain)
                runs.append({"system": system.name, "key": key, "dist": dist, "load": load, "rate": rate, **row})
                bar.update()
            cell_index += 1
    bar.close()
    return {
        "config": {
            "preset": args.preset, "model_id": model.info.model_id, "resolution": list(res), "cell": cell,
            "image_tokens": (res[0] // cell) * (res[1] // cell), "steps": args.steps, "duration": args.duration,
            "drain": args.drain, "seed": args.seed, "loads": args.loads, "dists": args.dists,
            "systems": {k: SYSTEMS[k] for k in args.systems}, "max_batch_size": B,
            "burst_requests": args.burst_batches * B, "capacity_rounds": args.capacity_rounds,
            "threads": args.threads, "templates": args.templates,
            "reference_system": SYSTEMS[ref], "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "beta": {d: list(MASK_DISTRIBUTIONS[d]) for d in args.dists}, "register_seconds": register_seconds,
        },
        "method": {
            "capacity": (f"Closed burst of N = {args.burst_batches * B} requests submitted at once; max throughput = "
                         f"(N - B) / (t_N - t_B) with t_k the k-th completion and B = {B} (first batch left out); "
                         f"mean of {args.capacity_rounds} rounds, rounds and systems interleaved."),
            "replay": (f"Poisson arrivals for {args.duration:g} s at rate = load x {SYSTEMS[ref]}'s max throughput "
                       "(offered req/s = the trace's realised arrivals / duration: short traces stray from the rate); "
                       f"same trace for every system in a cell; drain <= {args.drain:g} s; latency/queue stats "
                       "over completed requests; unfinished = still running at the drain deadline; throughput "
                       "= completed / (last completion - start). Queue = submit -> start of service (ours: "
                       "admission to the running batch, after pre-processing; diffusers: its batch's call)."),
        },
        "capacity": capacity,
        "runs": runs,
    }


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    if args.store:
        result = run(args, Path(args.store))
    else:
        with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
            result = run(args, Path(tmp))
    result["headline"] = report.headline(result)
    if args.plots:
        result["plots"] = [str(p) for p in report.plots(result, args.plots)]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    md = report.markdown(result)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(md + "\n")
    print(md)
    print()
    print("HEADLINE: " + report.headline_text(result).replace("\n", "\nHEADLINE: "))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
