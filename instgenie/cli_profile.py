"""`instgenie profile`: time a worker's denoising step and cache transfers on its own device, fit the cost model.

    instgenie profile --model flux-small --threads 1 --out var/profiles/flux-small.json [--s3-endpoint ...]

Compute: the real `Editor.step` (the engine loop's step: cache reads, packed sparse forward, scheduler step,
inpaint blend) over a grid of batch size x masked tokens per request x cache mode, each cell the fastest
(`--statistic min`, default) or the median of `--repeats` consecutive steps after a warm-up (consecutive, as
the engine loop steps one batch again and again with warm CPU caches; interleaving the cells measured a lower
R² on the digits model); fitted as seconds = a * FLOPs(batch) + d * X(batch) + c * requests + b (FLOPs from
engine/flops.py counted the way this engine attends in KV mode, guidance branches included; X the split KV
attention's masked passes over the template's cached keys, on CPU, where they run slower per FLOP; c is the step
loop's per-request work, see services/scheduler/profile.py; the plain a * FLOPs + b fit and the v1 form,
a * FLOPs(joint) + c * requests + b, are reported beside it). Transfers: step-shard-shaped blobs of a range of
sizes read from the object store the way a worker reads them (get, sha256, safetensors parse), and host ->
device copies (CUDA: pinned, non blocking, synchronised). A CPU worker has no device link: it reads caches in host memory in place, so the
profile records no host -> device transfer unless `--link-bandwidth` models one (as engine/pipeline.py's
BandwidthModel does); the host memcpy rate is measured and kept as a detail either way.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

PROMPT = "8"  # a digit for the digits model; the Flux presets' byte-level tokenizers take anything


def add_parser(commands, common: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = commands.add_parser("profile", help="measure this device's step and transfer times, fit the cost model",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits", help="preset (digits, flux-tiny, flux-small, ...) or model directory")
    p.add_argument("--models-dir", default="var/models", help="where presets are built and cached")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads, as the worker runs (0: default)")
    p.add_argument("--batches", default="1,2,4,8", help="batch sizes of the grid")
    p.add_argument("--masks", default="0.05,0.15,0.3,0.6,1.0",
                   help="masked share of the image tokens per request, for the grid")
    p.add_argument("--modes", default="", help="cache modes of the grid (default: every mode the model records: "
                   "kv,y for Flux, o for a UNet)")
    p.add_argument("--repeats", type=int, default=9, help="timed steps per cell (the median is kept)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per cell")
    p.add_argument("--statistic", default="min", choices=["min", "median"],
                   help="per cell: the fastest of the timed steps (the device's own speed, robust to other work on "
                        "the machine; the scheduler's online correction follows the speed it actually gets) or "
                        "their median")
    p.add_argument("--transfer-sizes", default="0.125,0.25,0.5,1,2,4,8,16",
                   help="blob sizes in MiB for the transfer fits")
    p.add_argument("--transfer-repeats", type=int, default=3)
    p.add_argument("--link-bandwidth", type=float, default=0.0,
                   help="CPU only: model a host -> device link of this many bytes/s (0: none, caches are read "
                        "in place)")
    p.add_argument("--s3-endpoint", default=os.environ.get("INSTGENIE_S3_ENDPOINT", ""),
                   help="measure object-store reads on this S3/MinIO server (env INSTGENIE_S3_ENDPOINT); "
                        "default: a local directory")
    p.add_argument("--s3-bucket", default=os.environ.get("INSTGENIE_S3_BUCKET", "instgenie"))
    p.add_argument("--s3-access-key", default=os.environ.get("INSTGENIE_S3_ACCESS_KEY", ""))
    p.add_argument("--s3-secret-key", default=os.environ.get("INSTGENIE_S3_SECRET_KEY", ""))
    p.add_argument("--store-dir", default="", help="measure reads from this directory (default: a temporary one)")
    p.add_argument("--out", default="", help="profile file (default: var/profiles/<model>@<device>.json)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON instead of tables")
    p.set_defaults(handler=run)
    return p


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def device_kind(device: str) -> str:
    """One profile per kind: "cpu", or "cuda:<GPU name>"."""
    import torch

    if device.startswith("cuda"):
        return f"cuda:{torch.cuda.get_device_name(torch.device(device))}"
    return "cpu"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


# ------------------------------------------------------------------------------------------------ compute
def _template_image(model):
    import numpy as np

    h, w = model.info.resolution
    rng = np.random.default_rng(0)
    shape = (h, w) if model.codec.image_channels == 1 else (h, w, 3)
    return (rng.random(shape) * 255).astype(np.uint8)


def _mask(model, tokens: int, seed: int):
    """A pixel mask whose token mask has exactly `tokens` tokens, token-aligned: random ones for Flux (its
    cost is the count, wherever they are); for a UNet a compact blob at a random place (a brush stroke: O-caching
    max-pools the mask per level, so scattered cells would cover almost every coarse token)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    unet = model.info.family == "unet-inpaint"
    cell = model.codec.scale_factor * (1 if unet else 2)
    h, w = model.info.resolution
    gh, gw = h // cell, w // cell
    grid = np.zeros((gh, gw), dtype=bool)
    if unet:  # rows of a near-square box, filled row by row
        bw = min(gw, max(1, round(tokens ** 0.5)))
        bh = min(gh, -(-tokens // bw))
        y, x = rng.integers(0, gh - bh + 1), rng.integers(0, gw - bw + 1)
        box = np.zeros(bh * bw, dtype=bool)
        box[:tokens] = True
        grid[y:y + bh, x:x + bw] = box.reshape(bh, bw)
    else:
        grid.flat[rng.permutation(grid.size)[:tokens]] = True
    return np.kron(grid, np.ones((cell, cell), dtype=bool)).astype(np.uint8) * 255


def model_shape(model, text_tokens: int):
    from instgenie.engine.flops import UNetShape
    from instgenie.services.scheduler.costmodel import UNET, ModelShape

    tr, info = model.transformer, model.info
    s = model.codec.scale_factor
    h, w = info.resolution
    branches = 2 if info.guidance == "cfg" else 1
    out_channels = int(tr.config.out_channels or tr.config.in_channels)
    if info.family == UNET:  # a UNet's tokens are its latent cells
        return ModelShape(info.model_id, image_tokens=(h // s) * (w // s), text_tokens=text_tokens, hidden=0,
                          dual_blocks=0, single_blocks=0, in_channels=int(tr.config.in_channels),
                          out_channels=out_channels, branches=branches, family=UNET, unet=UNetShape.of(tr))
    return ModelShape(info.model_id, image_tokens=(h // s // 2) * (w // s // 2), text_tokens=text_tokens,
                      hidden=int(tr.inner_dim), dual_blocks=len(tr.transformer_blocks),
                      single_blocks=len(tr.single_transformer_blocks), in_channels=int(tr.config.in_channels),
                      out_channels=out_channels, branches=branches, family=info.family)


def _unet_flops(shape, state) -> float:
    """One UNet request's step FLOPs with its mask's own per-level counts (what the engine computes), not the
    scheduler's compact-mask estimate: the profile fits the device's rate on the true work."""
    from instgenie.engine.flops import unet_step_flops
    from instgenie.engine.unet.ocache import level_masks

    h, w = state.latents.shape[-2:]
    levels = level_masks(state.mask.tokens.view(1, h, w).cpu(), shape.unet.levels)
    per_level = [int(m.sum()) for m in levels.values()]
    return shape.branches * unet_step_flops(shape.unet, h * w, shape.text_tokens, per_level)


def measure_compute(editor, batches: list[int], masks: list[float], modes: list[str], repeats: int, warmup: int,
                    progress=None) -> dict:
    """Median step seconds per (batch, masked tokens, mode) cell, with its FLOPs; pre/post seconds per request."""
    from instgenie.engine.request import EditRequest
    from instgenie.engine.transformer.attention import lse_split_available
    from instgenie.services.scheduler.costmodel import request_cached_flops, request_flops

    model = editor.model
    device = str(model.device)
    # the KV attention sparse_forward takes on this device and dtype: the FLOPs are counted as it computes them
    kv_attention = "split" if lse_split_available(model.device, model.transformer.dtype) else "joint"
    steps = warmup + repeats
    modes = modes or list(editor.cache_modes)
    templates = {mode: editor.register_template(_template_image(model), "3", mode=mode, seed=0, steps=steps)
                 for mode in modes}
    for manifest in templates.values():  # every step shard in memory first, as a worker's host tier holds them
        get = editor.cache.getter(manifest)
        for step in range(manifest.steps):
            get(step)
    shape = None
    image_tokens = None
    cells, pre, post = [], [], []
    for mode in modes:
        for batch in batches:
            for share in masks:
                if image_tokens is None:
                    image_tokens = editor.image_tokens(model.info.resolution)
                tokens = max(1, min(image_tokens, round(share * image_tokens)))
                states = []
                for i in range(batch):
                    req = EditRequest(template_id=templates[mode].template_id, mask=_mask(model, tokens, i),
                                      prompt=PROMPT, seed=i, request_id=f"profile-{mode}-{batch}-{tokens}-{i}")
                    t0 = time.perf_counter()
                    states.append(editor.start(req))
                    _sync(device)
                    pre.append(time.perf_counter() - t0)
                if shape is None:
                    shape = model_shape(model, int(states[0].text.prompt_embeds.shape[1]))
                times = []
                for k in range(steps):
                    _sync(device)
                    t0 = time.perf_counter()
                    failed = editor.step(states)
                    _sync(device)
                    if failed:
                        raise RuntimeError(f"profiling step failed: {failed}")
                    if k >= warmup:
                        times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                editor.finish(states[0])
                _sync(device)
                post.append(time.perf_counter() - t0)
                flops = (sum(_unet_flops(shape, st) for st in states) if shape.is_unet
                         else batch * request_flops(shape, tokens, mode, kv_attention))
                cells.append({"mode": mode, "batch": batch, "tokens": tokens, "flops": flops,
                              "cached_attention_flops": batch * request_cached_flops(shape, tokens, mode, kv_attention),
                              "flops_joint": flops if shape.is_unet else batch * request_flops(shape, tokens, mode),
                              "median_seconds": statistics.median(times), "min_seconds": min(times)})
                if progress:
                    progress(cells[-1])
    return {"shape": shape, "cells": cells, "kv_attention": kv_attention, "pre_seconds": statistics.median(pre),
            "post_seconds": statistics.median(post), "template_steps": steps}


# ---------------------------------------------------------------------------------------------- transfers
def _shard_blob(nbytes: int) -> bytes:
    import torch
    from safetensors.torch import save

    return save({"kv.0.k": torch.randn(max(1, nbytes // 4))})


def measure_store(blobs, sizes_mib: list[float], repeats: int) -> list[dict]:
    """Seconds to read a step-shard-shaped blob as a worker does: get, sha256 check, safetensors parse."""
    from safetensors.torch import load

    points = []
    prefix = f"profile-{os.getpid()}-{int(time.time())}"
    for mib in sizes_mib:
        data = _shard_blob(int(mib * 2 ** 20))
        key = f"{prefix}/{mib:g}.safetensors"
        blobs.put(key, data)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            got = blobs.get(key)
            hashlib.sha256(got).hexdigest()
            load(got)
            times.append(time.perf_counter() - t0)
        points.append({"bytes": len(data), "seconds": statistics.median(times)})
        try:
            blobs.delete_prefix(key)
        except Exception:  # noqa: BLE001 - a leftover blob is harmless
            pass
    return points


def measure_copy(device: str, sizes_mib: list[float], repeats: int) -> list[dict]:
    """Host -> device copy seconds (CUDA: pinned, non-blocking, synchronised); on CPU a plain memcpy."""
    import torch

    points = []
    for mib in sizes_mib:
        n = max(1, int(mib * 2 ** 20) // 4)
        host = torch.randn(n)
        if device.startswith("cuda"):
            host = host.pin_memory()
        times = []
        for _ in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            out = host.to(device, non_blocking=True) if device.startswith("cuda") else host.clone()
            _sync(device)
            times.append(time.perf_counter() - t0)
            del out
        points.append({"bytes": n * 4, "seconds": statistics.median(times[1:])})
    return points


# ---------------------------------------------------------------------------------------------------- fit
def fit_profile(model, kind: str, compute: dict, store_points: list[dict], copy_points: list[dict],
                link_bandwidth: float, details: dict):
    """The Profile these measurements give (least squares), with every point's fitted value and residual."""
    from instgenie.services.scheduler.profile import LinearFit, Profile, Regression, Transfer

    cells = compute["cells"]
    ys = [c["seconds"] for c in cells]
    # d only when the grid has cached-key passes to fit it on (a GPU's joint buffer, a y-only grid: none)
    names = ["flops", "cached_attention_flops", "requests", "one"]
    if not any(c["cached_attention_flops"] for c in cells):
        names.remove("cached_attention_flops")

    def row(c):
        return [c[n] if n in c else (c["batch"] if n == "requests" else 1.0) for n in names]

    fit = Regression.fit(names, [row(c) for c in cells], ys)
    v1 = Regression.fit(["flops_joint", "requests", "one"], [[c["flops_joint"], c["batch"], 1.0] for c in cells], ys)
    plain = LinearFit.fit([c["flops"] for c in cells], ys)
    for c in cells:
        c["fitted"] = fit(row(c))
        c["residual_pct"] = 100.0 * (c["seconds"] - c["fitted"]) / c["seconds"]
        c["fitted_v1"] = v1([c["flops_joint"], c["batch"], 1.0])
        c["fitted_plain"] = plain(c["flops"])
    store_fit = LinearFit.fit([p["bytes"] for p in store_points], [p["seconds"] for p in store_points])
    copy_fit = LinearFit.fit([p["bytes"] for p in copy_points], [p["seconds"] for p in copy_points])
    for points, f in ((store_points, store_fit), (copy_points, copy_fit)):
        for p in points:
            p["fitted"] = f(p["bytes"])
            p["residual_pct"] = 100.0 * (p["seconds"] - p["fitted"]) / p["seconds"]
    store = Transfer.from_fit(store_fit, f"measured: {details['store']} -> host (get, sha256, safetensors parse)")
    device = details["device"]
    if device.startswith("cuda"):
        h2d = Transfer.from_fit(copy_fit, "measured: pinned host -> device copy")
    elif link_bandwidth > 0:
        h2d = Transfer(link_bandwidth, 0.0, 1.0, "modelled: --link-bandwidth (BandwidthModel stand-in, CPU)")
    else:
        h2d = None  # the CPU worker reads host memory in place
    shape = compute["shape"]
    details.update({
        "shape": asdict(shape),
        "compute_fit": {"r2": fit.r2, "rmse_seconds": fit.rmse, "max_rel_residual": fit.max_rel_residual,
                        "points": fit.points},
        "compute_fit_v1": {"form": "seconds = a * flops(joint KV attention) + c * requests + b",
                           "a": v1.coef("flops_joint"), "b": v1.coef("one"), "c": v1.coef("requests"), "r2": v1.r2,
                           "rmse_seconds": v1.rmse, "max_rel_residual": v1.max_rel_residual},
        "compute_fit_plain": {"form": "seconds = a * flops + b", "a": plain.slope, "b": plain.intercept,
                              "r2": plain.r2, "rmse_seconds": plain.rmse, "max_rel_residual": plain.max_rel_residual},
        "compute_cells": cells,
        "store_fit": {"r2": store_fit.r2, "rmse_seconds": store_fit.rmse, "max_rel_residual": store_fit.max_rel_residual},
        "store_points": store_points,
        "host_copy_fit": {"bandwidth": 1.0 / copy_fit.slope if copy_fit.slope > 0 else None,
                          "latency": copy_fit.intercept, "r2": copy_fit.r2},
        "host_copy_points": copy_points,
        "template_steps_used": compute["template_steps"],
    })
    d = fit.coef("cached_attention_flops") if "cached_attention_flops" in names else 0.0
    return Profile(model_id=model.info.model_id, device_kind=kind, compute_a=fit.coef("flops"),
                   compute_b=fit.coef("one"), compute_c=fit.coef("requests"), compute_r2=fit.r2, store_to_host=store,
                   host_to_device=h2d, pre_seconds=compute["pre_seconds"], post_seconds=compute["post_seconds"],
                   config_hash=model.info.config_hash, details=details, compute_d=d,
                   kv_attention=compute.get("kv_attention", "joint"))


# ----------------------------------------------------------------------------------------------- command
def _open_blobs(args, tmp: str):
    from instgenie.services.common.objectstore import LocalObjectStore, S3ObjectStore

    if args.s3_endpoint:
        return S3ObjectStore(args.s3_endpoint, args.s3_access_key, args.s3_secret_key, args.s3_bucket), \
            f"s3://{args.s3_endpoint}/{args.s3_bucket}"
    root = args.store_dir or tmp
    return LocalObjectStore(root), f"local directory {root}"


def profile(args, progress=None):
    """Measure and fit; returns the Profile (not yet written)."""
    import torch

    from instgenie.engine.editors import editor_for
    from instgenie.engine.models.loader import load_model, preset_model
    from instgenie.engine.template_cache import TemplateStore
    from instgenie.services.worker.runtime import PRESETS

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = (preset_model(args.model, root=args.models_dir, device=device) if args.model in PRESETS
             else load_model(args.model, device=device))
    loadavg = os.getloadavg()[0]  # other work on the machine while measuring, kept with the profile
    with tempfile.TemporaryDirectory(prefix="instgenie-profile-") as tmp:
        blobs, where = _open_blobs(args, tmp)
        started = time.time()
        editor = editor_for(model, TemplateStore(blobs, prefix=f"profile-templates-{os.getpid()}"))
        compute = measure_compute(editor, [int(b) for b in _floats(args.batches)], _floats(args.masks),
                                  [m.strip() for m in args.modes.split(",") if m.strip()], args.repeats,
                                  args.warmup, progress)
        for cell in compute["cells"]:
            cell["seconds"] = cell[f"{args.statistic}_seconds"]
        sizes = _floats(args.transfer_sizes)
        store_points = measure_store(blobs, sizes, args.transfer_repeats)
        copy_points = measure_copy(device, sizes, args.transfer_repeats)
        close = getattr(blobs, "close", None)
        if close:
            close()
    details = {"device": device, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "statistic": args.statistic, "repeats": args.repeats,
               "loadavg_before_after": [loadavg, os.getloadavg()[0]],
               "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "store": where,
               "measured_seconds": round(time.time() - started, 1),
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return fit_profile(model, device_kind(device), compute, store_points, copy_points, args.link_bandwidth, details)


def report(profile) -> str:
    """Fits, R², and every point's residual, as text tables."""
    d = profile.details
    cf, plain, v1 = d["compute_fit"], d["compute_fit_plain"], d.get("compute_fit_v1")
    lines = [f"profile {profile.profile_id}", "",
             f"compute  = {profile.compute_a:.4e} s/FLOP x FLOPs + {profile.compute_d:.4e} s/FLOP x cached-key "
             f"attention FLOPs ({profile.kv_attention} KV attention) + {profile.compute_c * 1e3:.3f} ms x requests + "
             f"{profile.compute_b * 1e3:.3f} ms   (R² = {profile.compute_r2:.4f}, RMSE {cf['rmse_seconds'] * 1e3:.3f} "
             f"ms, worst residual {100 * cf['max_rel_residual']:.1f} %, {cf['points']} cells, "
             f"{d['torch_threads']} torch threads, {d['statistic']} of {d.get('repeats', '?')} steps per cell, "
             f"load average {d['loadavg_before_after'][0]:.2f} before / {d['loadavg_before_after'][1]:.2f} after)",
             f"           = {1 / profile.compute_a / 1e9:.2f} GFLOP/s effective" if profile.compute_a > 0 else "",
             f"v1 form, a * FLOPs(joint) + c * requests + b: {v1['a']:.4e} s/FLOP, {v1['c'] * 1e3:.3f} ms, "
             f"{v1['b'] * 1e3:.3f} ms   (R² = {v1['r2']:.4f}, worst residual {100 * v1['max_rel_residual']:.1f} %)"
             if v1 else None,
             f"a * FLOPs + b alone: {plain['a']:.4e} s/FLOP x FLOPs + {plain['b'] * 1e3:.3f} ms   "
             f"(R² = {plain['r2']:.4f}, worst residual {100 * plain['max_rel_residual']:.1f} %)",
             "", "| mode | batch | tokens/request | GFLOPs | of which cached-key | measured ms | fitted ms | residual "
             "| v1 fit residual |", "|---|---|---|---|---|---|---|---|---|"]
    for c in d["compute_cells"]:
        old = (f"{100.0 * (c['seconds'] - c['fitted_v1']) / c['seconds']:+.1f} %" if "fitted_v1" in c else "")
        lines.append(f"| {c['mode']} | {c['batch']} | {c['tokens']} | {c['flops'] / 1e9:.3f} | "
                     f"{c.get('cached_attention_flops', 0.0) / 1e9:.3f} | {c['seconds'] * 1e3:.2f} | "
                     f"{c['fitted'] * 1e3:.2f} | {c['residual_pct']:+.1f} % | {old} |")
    s = profile.store_to_host
    lines += ["", f"store -> host = bytes / {s.bandwidth / 1e6:.1f} MB/s + {s.latency * 1e3:.2f} ms   "
              f"(R² = {s.r2:.4f}; {s.source})", "", "| MiB | measured ms | fitted ms | residual |", "|---|---|---|---|"]
    for p in d["store_points"]:
        lines.append(f"| {p['bytes'] / 2 ** 20:.2f} | {p['seconds'] * 1e3:.2f} | {p['fitted'] * 1e3:.2f} | "
                     f"{p['residual_pct']:+.1f} % |")
    h = profile.host_to_device
    copy = d["host_copy_fit"]
    lines += ["", ("host -> device = " + (f"bytes / {h.bandwidth / 1e9:.2f} GB/s + {h.latency * 1e3:.3f} ms "
                                           f"(R² = {h.r2:.4f}; {h.source})" if h else
                                           "none: this CPU worker reads caches in host memory in place")),
              f"host memcpy measured: {copy['bandwidth'] / 1e9:.2f} GB/s (R² = {copy['r2']:.4f})"
              if copy["bandwidth"] else "host memcpy: no fit",
              f"per request: pre-processing {profile.pre_seconds * 1e3:.1f} ms, post-processing "
              f"{profile.post_seconds * 1e3:.1f} ms (medians)"]
    return "\n".join(line for line in lines if line is not None)


def run(args) -> int:
    def progress(cell):
        print(f"  {cell['mode']} batch {cell['batch']} tokens {cell['tokens']}: {cell['min_seconds'] * 1e3:.2f} ms "
              f"(median {cell['median_seconds'] * 1e3:.2f})", file=sys.stderr)

    from instgenie.engine.errors import InstGenIEError

    print(f"profiling {args.model} ...", file=sys.stderr)
    try:
        prof = profile(args, None if args.json else progress)
    except (InstGenIEError, ValueError, OSError) as err:  # a model that will not load, a fit that cannot be made
        print(f"error: {err}", file=sys.stderr)
        return 1
    out = Path(args.out or f"var/profiles/{prof.model_id}@{prof.device_kind.replace('/', '_')}.json")
    prof.save(out)
    if args.json:
        print(json.dumps(prof.to_dict(), indent=1))
    else:
        print(report(prof))
        print(f"\nwrote {out}; use it with `--profile {out}` on the scheduler and on workers of this model and device")
    return 0
