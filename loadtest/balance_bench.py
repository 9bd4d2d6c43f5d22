"""Load balancing over the real mesh: the same Poisson traces under each placement policy, side by side.

    python -m loadtest.balance_bench --json out/balance.json --md out/balance.md --plots out/

The mesh is the local one (services/local: S3 server, scheduler, two CPU workers with one torch thread each,
gateway; every one a process), serving the digits model by default. The workload is what a template-editing
service sees: `--templates` registered templates, drawn with Zipf popularity, more than the workers' host
memory holds (`--host-templates` per worker), so placement decides how often a cache must come from the
object store; masks from the paper's production distribution (mean 0.11), token-aligned and heterogeneous.

Method.
  1. The cost-model profile: `--profile`, or measured first (`instgenie profile` on this machine, object
     store reads against a local S3 server like the mesh's). Scheduler and workers get it.
  2. Capacity: a closed burst under least-requests, steady-state completions/s (as serving_bench measures it).
  3. For each load (x that capacity): one Poisson trace, replayed once per policy (the order rotates per
     load), all on the same running mesh: the scheduler's policy is switched with ConfigurePlacement, its
     statistics reset, and every template dropped from the workers' host memory first, so each run starts
     cold. Latency = client-side unary Edit through the gateway. A load is *sustained* when every request
     completed and throughput >= 90 % of the offered rate.
  4. Reported: mean / P50 / P95 / P99 latency, throughput, template cache hit ratio (the scheduler's count of
     placements on a worker holding the template), the scheduler's prediction error; JSON, Markdown, PNG.
Everything shares this machine's 2 cores: the workers' torch threads, the S3 server, scheduler, gateway and
this client.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import numpy as np

from instgenie.gateway.v1 import edit_service_pb2 as pb
from instgenie.gateway.v1 import edit_service_pb2_grpc as pb_grpc
from instgenie.scheduler.v1 import scheduler_service_pb2 as spb
from instgenie.scheduler.v1 import scheduler_service_pb2_grpc as spb_grpc
from instgenie.services.local.mesh import LocalMesh, MeshConfig
from instgenie.services.scheduler.costmodel import ModelShape
from instgenie.services.scheduler.profile import Profile

from . import balance_report
from .outputs import write_outputs
from .simulate import cache_bytes
from .trace import PROMPTS, sample_ratios, synth_grid

TENANT, KEY = "bench", "bench-key-0123456789"
MD = (("authorization", f"Bearer {KEY}"),)
POLICIES = ("predicted-finish", "least-requests", "least-masked-tokens", "round-robin")


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- setup
def measure_profile(model: str, models_dir: Path, out: Path, quick: bool) -> Profile:
    """`instgenie profile` (one torch thread, as the workers), object-store reads against a local S3 server."""
    from .profile_local import run as profile_local

    grid = ["--batches", "1,4", "--masks", "0.1,0.5,1.0", "--modes", "kv", "--repeats", "3",
            "--transfer-sizes", "0.25,1,4"] if quick else []
    if profile_local(model, out, str(models_dir), grid) != 0:
        raise RuntimeError(f"instgenie profile of {model} failed")
    return Profile.load(out)


def template_images(model: str, n: int, seed: int, shape: ModelShape) -> list[tuple[np.ndarray, str]]:
    """(image, prompt) per template: real handwritten digits for the digits model, noise otherwise."""
    if model == "digits":
        from instgenie.engine.latents import tensor_to_image
        from instgenie.engine.models.digits import load_digits_dataset

        images, labels = load_digits_dataset("test")
        return [(np.asarray(tensor_to_image(images[i])), str(int(labels[i]))) for i in range(n)]
    rng = np.random.default_rng(seed)
    side = 16 * int(round(shape.image_tokens ** 0.5))  # Flux presets: 16 px per token side
    return [((rng.random((side, side, 3)) * 255).astype(np.uint8), PROMPTS[i % len(PROMPTS)]) for i in range(n)]


def poisson_times(rate: float, duration: float, rng: np.random.Generator) -> list[float]:
    times, t = [], 0.0
    while True:
        t += rng.exponential(1.0 / rate)
        if t >= duration:
            return times
        times.append(t)


def make_trace(times: list[float] | None, seed: int, templates: int, zipf: float, grid: tuple[int, int],
               cell: int, dist: str, digits: bool, rate: float = 0.0, duration: float = 0.0) -> list[dict]:
    """Poisson arrivals of `rate` over `duration` (or the given times); Zipf templates; token-aligned masks of
    the distribution's ratios; prompts a digit label for the digits model."""
    rng = np.random.default_rng(seed)
    if times is None:
        times = poisson_times(rate, duration, rng)
    weights = np.arange(1, templates + 1, dtype=float) ** -zipf
    picks = rng.choice(templates, size=len(times), p=weights / weights.sum())
    ratios = sample_ratios(dist, len(times), rng)
    out = []
    for i, (at, tpl, ratio) in enumerate(zip(times, picks, ratios)):
        cells, _ = synth_grid(float(ratio), grid, rng)
        mask = np.kron(cells, np.ones((cell, cell), dtype=bool)).astype(np.uint8) * 255
        prompt = str(int(rng.integers(10))) if digits else PROMPTS[int(rng.integers(len(PROMPTS)))]
        out.append({"index": i, "arrival": float(at), "template": int(tpl), "ratio": float(cells.mean()),
                    "mask": _png(mask), "prompt": prompt, "seed": int(rng.integers(2 ** 31))})
    return out


# --------------------------------------------------------------------------------------------- replay
async def replay(address: str, template_ids: list[str], trace: list[dict], drain: float,
                 deadline: float = 120.0) -> dict:
    """Each request submitted at its arrival time (unary Edit through the gateway); latencies client-side."""
    results: dict[int, tuple[str, float, float]] = {}
    retries = [0]
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.EditServiceStub(ch)

        async def one(r: dict, start: float):
            await asyncio.sleep(max(0.0, start + r["arrival"] - time.perf_counter()))
            t0 = time.perf_counter()
            edit = pb.EditRequest(template_id=template_ids[r["template"]], mask=r["mask"], prompt=r["prompt"],
                                  seed=r["seed"], request_id=uuid.uuid4().hex)
            while True:
                try:
                    await stub.Edit(edit, metadata=MD, timeout=max(1.0, deadline - (time.perf_counter() - t0)))
                    results[r["index"]] = ("ok", time.perf_counter() - t0, time.perf_counter() - start)
                    return
                except grpc.aio.AioRpcError as exc:
                    # Every worker full: a client retries (same request id) after a pause, as RetryInfo asks.
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.perf_counter() - t0 < deadline:
                        retries[0] += 1
                        await asyncio.sleep(0.2)
                        continue
                    results[r["index"]] = (exc.code().name, time.perf_counter() - t0, time.perf_counter() - start)
                    return

        start = time.perf_counter()
        tasks = [asyncio.ensure_future(one(r, start)) for r in trace]
        end = trace[-1]["arrival"] + drain if trace else 0.0
        done, pending = await asyncio.wait(tasks, timeout=max(0.0, start + end - time.perf_counter()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    ok = [v for v in results.values() if v[0] == "ok"]
    lat = np.array([v[1] for v in ok])
    last = max((v[2] for v in ok), default=0.0)
    failed = [v[0] for v in results.values() if v[0] != "ok"]
    pct = (lambda q: float(np.percentile(lat, q)) if len(lat) else None)
    return {"latencies": [float(x) for x in lat],
            "offered": len(trace), "completed": len(ok), "failed": len(failed), "full_retries": retries[0],
            "errors": sorted(set(failed))[:5], "unfinished": len(trace) - len(results),
            "throughput_rps": len(ok) / last if last > 0 else 0.0,
            "latency_mean": float(lat.mean()) if len(lat) else None, "latency_p50": pct(50),
            "latency_p95": pct(95), "latency_p99": pct(99)}


def burst_capacity(address: str, template_ids: list[str], trace: list[dict], batch: int) -> float:
    """Closed burst: all at once; completions/s after the first `batch` (pipeline fill) finished."""
    ends: list[float] = []

    async def run():
        async with grpc.aio.insecure_channel(address) as ch:
            stub = pb_grpc.EditServiceStub(ch)
            start = time.perf_counter()

            async def one(r):
                await stub.Edit(pb.EditRequest(template_id=template_ids[r["template"]], mask=r["mask"],
                                               prompt=r["prompt"], seed=r["seed"], request_id=uuid.uuid4().hex),
                                metadata=MD, timeout=300)
                ends.append(time.perf_counter() - start)

            await asyncio.gather(*(one(r) for r in trace))

    asyncio.run(run())
    ends.sort()
    skip = min(batch, len(ends) // 2)  # a burst too small to leave a whole batch out leaves half
    return (len(ends) - skip) / (ends[-1] - ends[skip - 1]) if skip else len(ends) / ends[-1]


class Mesh:
    """The local mesh plus a scheduler stub: switch policies, reset statistics, drop caches, read counters."""

    def __init__(self, mesh: LocalMesh):
        self.mesh = mesh
        self.channel = grpc.insecure_channel(mesh.scheduler.address)
        self.scheduler = spb_grpc.SchedulerServiceStub(self.channel)

    def prepare(self, policy: str, template_ids: list[str]) -> None:
        for tid in template_ids:  # every run starts cold
            self.scheduler.ForgetTemplate(spb.ForgetTemplateRequest(template_id=tid), timeout=10)
        self.scheduler.ConfigurePlacement(spb.ConfigurePlacementRequest(policy=policy, reset_statistics=True),
                                          timeout=10)
        time.sleep(1.0)  # a load report round: the scheduler sees the emptied host tiers

    def status(self) -> spb.GetClusterStatusResponse:
        return self.scheduler.GetClusterStatus(spb.GetClusterStatusRequest(), timeout=10)

    def close(self) -> None:
        self.channel.close()


def run_stats(status: spb.GetClusterStatusResponse) -> dict:
    placed = status.placed_resident + status.placed_loading + status.placed_cold
    p = status.prediction
    return {"placed_resident": status.placed_resident, "placed_loading": status.placed_loading,
            "placed_cold": status.placed_cold, "hit_ratio": status.placed_resident / placed if placed else 0.0,
            "templates_warmed": status.templates_warmed, "prediction_edits": p.edits,
            "prediction_mean_error_s": p.mean_error_seconds, "prediction_mape": p.mean_abs_relative_error,
            "prediction_p95_ape": p.p95_abs_relative_error,
            "speeds": {w.worker.worker_id: round(w.prediction.speed, 3) for w in status.workers},
            "cost_models": {w.worker.worker_id: w.cost_model for w in status.workers}}


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits")
    ap.add_argument("--profile", default="", help="a profile file; default: measure one first")
    ap.add_argument("--quick-profile", action="store_true", help="a small profiling grid (tests)")
    ap.add_argument("--templates", type=int, default=16)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--host-templates", type=float, default=4, help="template caches a worker's host memory holds")
    ap.add_argument("--store-mbps", type=float, default=0.0,
                    help="cap each worker's object-store reads at this many MB/s (worker --store-read-mbps; 0: none): "
                    "gives template loads the weight they have beside an edit in production")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--loads", default="0.2,0.3,0.4,0.5", help="offered load x least-requests' burst capacity")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--dist", default="production", help="mask ratio distribution (loadtest/trace.py)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per run")
    ap.add_argument("--rounds", type=int, default=2,
                    help="traces per load (each replayed under every policy); latencies are pooled over rounds")
    ap.add_argument("--drain", type=float, default=30.0, help="seconds a run waits after the last arrival")
    ap.add_argument("--burst", type=int, default=0, help="requests of the capacity burst (0: 6 x batch x workers)")
    ap.add_argument("--capacity", type=float, default=0.0, help="skip the burst: use this many requests/s")
    ap.add_argument("--scheduler-args", default="", help="extra scheduler flags, e.g. '--affinity-slack 0'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="", help="keep the mesh's state here (default: a temporary directory)")
    ap.add_argument("--json", default="out/balance.json")
    ap.add_argument("--md", default="out/balance.md")
    ap.add_argument("--plots", default="", help="directory for PNG plots ('' = none)")
    return ap.parse_args(argv)


def run(args, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    models = work / "models"
    t0 = time.time()
    profile = Profile.load(args.profile) if args.profile else \
        measure_profile(args.model, models, work / "profile.json", args.quick_profile)
    profile_path = args.profile or str(work / "profile.json")
    shape = ModelShape(**profile.details["shape"])
    steps = {"digits": 20}.get(args.model, 8)
    per_template = cache_bytes(shape, steps)
    host_bytes = int(args.host_templates * per_template)
    print(f"profile {profile.profile_id} (R² {profile.compute_r2:.4f}); host memory {host_bytes / 1e6:.1f} MB per "
          f"worker = {args.host_templates:g} templates of {per_template / 1e6:.2f} MB"
          + (f"; store reads capped at {args.store_mbps:g} MB/s ({per_template / 1e6 / args.store_mbps:.2f} s per "
             "template)" if args.store_mbps else ""), file=sys.stderr)
    keys = work / "api-keys.json"  # the default tenant limit (64 in flight) would cap the capacity burst
    keys.write_text(json.dumps({"tenants": {TENANT: {"keys": [KEY], "max_in_flight": 100000}}}))
    config = MeshConfig(state_dir=work / "mesh", workers=2, model=args.model, tenants={"local": "unused-key-0123456789"},
                        torch_threads=1, gateway_args=["--api-keys-file", str(keys)],
                        host_cache_bytes=host_bytes, max_batch_size=args.max_batch_size,
                        scheduler_args=["--profile", profile_path, *args.scheduler_args.split()],
                        worker_args=["--profile", profile_path, "--models-dir", str(models),
                                     *(["--store-read-mbps", str(args.store_mbps)] if args.store_mbps else [])])
    mesh = LocalMesh(config).start()
    ctl = Mesh(mesh)
    try:
        with grpc.insecure_channel(mesh.gateway.address) as ch:
            stub = pb_grpc.EditServiceStub(ch)
            ids = [_create(stub, img, prompt)
                   for img, prompt in template_images(args.model, args.templates, args.seed, shape)]
        digits = args.model == "digits"
        side = int(round(shape.image_tokens ** 0.5))  # tokens per side of the (square) grid
        cell = 2 if digits else 16  # pixels per token side: latent scale (1 for digits, 8 for Flux) x patch 2
        trace_args = dict(templates=args.templates, zipf=args.zipf, grid=(side, side), cell=cell, dist=args.dist,
                          digits=digits)
        capacity = args.capacity
        if not capacity:
            ctl.prepare("least-requests", ids)
            n = args.burst or 3 * args.max_batch_size * 2  # within the workers' capacity (4 x batch each)
            capacity = burst_capacity(mesh.gateway.address, ids, make_trace([0.0] * n, args.seed + 7, **trace_args),
                                      args.max_batch_size * 2)
        print(f"least-requests burst capacity {capacity:.2f} req/s", file=sys.stderr)
        policies = args.policies.split(",")
        rounds = []
        k = 0
        for li, load in enumerate(float(x) for x in args.loads.split(",")):
            rate = load * capacity
            for rnd in range(args.rounds):
                seed = args.seed + 100 * (li + 1) + rnd
                trace = make_trace(None, seed, rate=rate, duration=args.duration, **trace_args)
                for policy in policies[k % len(policies):] + policies[:k % len(policies)]:
                    ctl.prepare(policy, ids)
                    row = asyncio.run(replay(mesh.gateway.address, ids, trace, args.drain))
                    row.update(run_stats(ctl.status()), policy=policy, load=load, rate=rate, round=rnd,
                               offered_rps=len(trace) / args.duration,
                               mean_mask=float(np.mean([r["ratio"] for r in trace])) if trace else 0.0)
                    # Other work on this machine shows here: the mesh has the cores to itself only if this
                    # stays near what the mesh itself puts there (about 2-3 at high load).
                    row["loadavg_1min"] = os.getloadavg()[0]
                    row["sustained"] = (row["unfinished"] == 0 and row["failed"] == 0
                                        and row["throughput_rps"] >= 0.9 * row["offered_rps"])
                    rounds.append(row)
                    print(f"load {load:.2f} ({rate:.1f}/s) round {rnd} {policy:20s} P95 "
                          f"{row['latency_p95'] or float('nan'):.3f} s mean {row['latency_mean'] or float('nan'):.3f} s "
                          f"thr {row['throughput_rps']:.1f}/s hit {row['hit_ratio']:.0%} unfinished "
                          f"{row['unfinished']} failed {row['failed']}", file=sys.stderr)
                k += 1
    finally:
        ctl.close()
        mesh.stop()
    return {"config": {k: v for k, v in vars(args).items()} | {
                "profile_id": profile.profile_id, "profile_r2": profile.compute_r2, "steps": steps,
                "template_cache_mb": per_template / 1e6, "host_cache_mb": host_bytes / 1e6, "workers": 2,
                "torch_threads": 1, "cpu_count": os.cpu_count(), "capacity_rps": capacity,
                "wall_seconds": round(time.time() - t0)},
            "runs": pool(rounds), "rounds": [{k: v for k, v in r.items() if k != "latencies"} for r in rounds]}


def pool(rounds: list[dict]) -> list[dict]:
    """One row per (load, policy) over its rounds: latencies pooled, counts summed, ratios over the sums; a
    load is sustained only if every round was."""
    out = []
    for key in dict.fromkeys((r["load"], r["policy"]) for r in rounds):
        rs = [r for r in rounds if (r["load"], r["policy"]) == key]
        lat = np.array([x for r in rs for x in r["latencies"]])
        pct = (lambda q: float(np.percentile(lat, q)) if len(lat) else None)
        placed = sum(r["placed_resident"] + r["placed_loading"] + r["placed_cold"] for r in rs)
        sums = {k: sum(r[k] for r in rs) for k in ("offered", "completed", "failed", "unfinished", "full_retries",
                                                  "placed_resident", "placed_loading", "placed_cold",
                                                  "templates_warmed", "prediction_edits")}
        out.append({**sums, "load": key[0], "policy": key[1], "rate": rs[0]["rate"], "rounds": len(rs),
                    "offered_rps": float(np.mean([r["offered_rps"] for r in rs])),
                    "throughput_rps": float(np.mean([r["throughput_rps"] for r in rs])),
                    "latency_mean": float(lat.mean()) if len(lat) else None, "latency_p50": pct(50),
                    "latency_p95": pct(95), "latency_p99": pct(99),
                    "round_p95": [r["latency_p95"] for r in rs],
                    "hit_ratio": sums["placed_resident"] / placed if placed else 0.0,
                    "prediction_mape": float(np.mean([r["prediction_mape"] for r in rs])),
                    "prediction_mean_error_s": float(np.mean([r["prediction_mean_error_s"] for r in rs])),
                    "speeds": rs[-1]["speeds"], "cost_models": rs[-1]["cost_models"],
                    "loadavg_1min": float(np.mean([r["loadavg_1min"] for r in rs])),
                    "sustained": all(r["sustained"] for r in rs),
                    "errors": sorted({e for r in rs for e in r["errors"]})})
    return out


def _create(stub, image: np.ndarray, prompt: str) -> str:
    op = stub.CreateTemplate(pb.CreateTemplateRequest(image=_png(image), prompt=prompt), metadata=MD,
                             timeout=60).operation
    op = stub.WaitOperation(pb.WaitOperationRequest(name=op.name), metadata=MD, timeout=300).operation
    if op.HasField("error"):
        raise RuntimeError(op.error.message)
    meta = pb.CreateTemplateMetadata()
    op.metadata.Unpack(meta)
    return meta.template_id


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.workdir:
        result = run(args, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="balance-bench-") as tmp:
            result = run(args, Path(tmp))
    result["headline"] = balance_report.headline(result)
    if args.plots:
        result["plots"] = [str(p) for p in balance_report.plots(result, args.plots)]
    md = balance_report.markdown(result)
    write_outputs(result, md, args.json, args.md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
