"""gRPC load generator against a running mesh: Poisson arrivals, mask-ratio distributions, Zipf template popularity.

    python -m loadtest.loadgen --target 127.0.0.1:50051 --api-key KEY --rates 2,4,8 --duration 30 --out out/loadtest
    python -m loadtest.loadgen --local-mesh 2 --rates 2,4,8 ...      # starts its own local mesh (2 workers) first

For each offered rate (edits/s) it sends edits with exponential inter-arrival times (a seeded Poisson process)
for `--duration` seconds or `--max-requests` edits, whichever comes first, then waits for the answers (at most
`--drain-seconds`). Each edit picks a template by Zipf popularity (the k-th most popular with probability
proportional to 1/k^s) among `--templates` it registers first, and a mask ratio from a named distribution
(loadtest/trace.py: the paper's production and public traces, or `uniform`), drawn as an ellipse or rectangle on
the model's token grid. The edits go through the gateway's public `Edit` call, each with its own deadline.

Only loopback targets are accepted (127.0.0.0/8, ::1, localhost): this is a tool for a mesh on this machine.
With the mesh's /metrics addresses (`--metrics`, or `--local-mesh`), the workers' batch sizes and cache tiers
per load level are read from the Prometheus counters before and after it.

The report (loadtest/loadreport.py): `<out>.json` (configuration, per-level summary, every request),
`<out>.md` and `<out>.png` (latency percentiles and throughput against the offered load, latency CDFs).
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import io
import json
import tempfile
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from instgenie.gateway.v1 import edit_service_pb2 as pb
from instgenie.gateway.v1 import edit_service_pb2_grpc as pb_grpc

from .trace import MASK_DISTRIBUTIONS, RATIO_RANGE, synth_grid

DISTRIBUTIONS = (*sorted(MASK_DISTRIBUTIONS), "uniform")


def check_loopback(target: str) -> None:
    host = target.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise SystemExit(f"refusing {target}: the load generator only targets loopback addresses")


def zipf_weights(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


def mask_ratios(dist: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if dist == "uniform":
        return rng.uniform(*RATIO_RANGE, size=n)
    a, b = MASK_DISTRIBUTIONS[dist]
    return np.clip(rng.beta(a, b, size=n), *RATIO_RANGE)


def mask_png(ratio: float, width: int, height: int, cell: int, rng: np.random.Generator) -> bytes:
    grid, _ = synth_grid(ratio, (height // cell, width // cell), rng)
    pixels = np.kron(grid.astype(np.uint8) * 255, np.ones((cell, cell), dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Record:
    level: int
    rate: float
    sent_at: float  # seconds since the level began
    template_rank: int  # 0 = the most popular
    mask_ratio: float  # drawn
    status: str = ""
    latency: float = 0.0
    queue_seconds: float = 0.0
    worker: str = ""
    result_mask_ratio: float = 0.0


class LoadGenerator:
    def __init__(self, target: str, api_key: str, *, deadline: float = 120.0):
        check_loopback(target)
        self.target = target
        self.metadata = (("authorization", f"Bearer {api_key}"),)
        self.deadline = deadline
        self.channel = grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20),
                                                                  ("grpc.max_send_message_length", 64 << 20)])
        self.stub = pb_grpc.EditServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def model(self, name: str = "") -> pb.Model:
        models = (await self.stub.ListModels(pb.ListModelsRequest(), metadata=self.metadata, timeout=30)).models
        if not models:
            raise SystemExit("the mesh serves no model")
        chosen = [m for m in models if not name or m.name == name]
        if not chosen:
            raise SystemExit(f"model {name!r} not served; served: {[m.name for m in models]}")
        return chosen[0]

    async def register(self, model: pb.Model, count: int, seed: int) -> list[str]:
        """`count` templates of the model's size (smooth random images), registered and READY."""
        rng = np.random.default_rng(seed)
        ids = []
        for i in range(count):
            small = rng.integers(0, 256, size=(max(2, model.height // 4), max(2, model.width // 4), 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((model.width, model.height), Image.BILINEAR)
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            op = (await self.stub.CreateTemplate(pb.CreateTemplateRequest(
                image=buf.getvalue(), prompt=str(i % 10), model=model.name, name=f"loadgen {i}"),
                metadata=self.metadata, timeout=60)).operation
            op = (await self.stub.WaitOperation(pb.WaitOperationRequest(name=op.name), metadata=self.metadata,
                                                timeout=600)).operation
            if op.HasField("error"):
                raise SystemExit(f"template {i} failed to register: {op.error.message}")
            meta = pb.CreateTemplateMetadata()
            op.metadata.Unpack(meta)
            ids.append(meta.template_id)
        return ids

    async def edit(self, record: Record, template_id: str, mask: bytes, seed: int, t0: float) -> None:
        start = time.monotonic()
        try:
            resp = await self.stub.Edit(pb.EditRequest(request_id=uuid.uuid4().hex, template_id=template_id,
                                                       mask=mask, prompt=str(seed % 10), seed=seed),
                                        metadata=self.metadata, timeout=self.deadline)
            record.status = "OK"
            record.queue_seconds = resp.result.queue_seconds
            record.worker = resp.result.worker
            record.result_mask_ratio = resp.result.mask_ratio
        except grpc.aio.AioRpcError as exc:
            record.status = exc.code().name
        record.latency = time.monotonic() - start

    async def level(self, index: int, rate: float, templates: list[str], model: pb.Model, *, duration: float,
                    max_requests: int, drain: float, dist: str, zipf: float, cell: int, seed: int) -> list[Record]:
        """One offered load: Poisson arrivals for `duration` s or `max_requests` edits, then their answers."""
        rng = np.random.default_rng([seed, index])
        gaps = rng.exponential(1.0 / rate, size=max_requests)
        arrivals = np.cumsum(gaps)
        arrivals = arrivals[arrivals < duration]
        ranks = rng.choice(len(templates), size=len(arrivals), p=zipf_weights(len(templates), zipf))
        ratios = mask_ratios(dist, len(arrivals), rng)
        masks = [mask_png(r, model.width, model.height, cell, rng) for r in ratios]
        records, tasks = [], []
        t0 = time.monotonic()
        for i, at in enumerate(arrivals):
            delay = t0 + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            rec = Record(index, rate, time.monotonic() - t0, int(ranks[i]), float(ratios[i]))
            records.append(rec)
            tasks.append(asyncio.ensure_future(self.edit(rec, templates[ranks[i]], masks[i], int(seed + i), t0)))
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=drain)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for rec in records:
            rec.status = rec.status or "UNFINISHED"
        return records


# ------------------------------------------------------------------------------------------------ metrics
def scrape(addresses: list[str]) -> dict[str, float]:
    """Sums over the processes of the counters the report reads, from their Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"instgenie_worker_batch_size": ("sum", "count"), "instgenie_worker_step_tokens": ("sum", "count"),
              "instgenie_worker_edits": ("host", "store")}
    out: dict[str, float] = {}
    for address in addresses:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name not in wanted:
                continue
            for s in family.samples:
                if s.name.endswith("_sum") or s.name.endswith("_count"):
                    key = f"{family.name}_{s.name.rsplit('_', 1)[1]}"
                elif s.name.endswith("_total") and "cache_tier" in s.labels:
                    key = f"edits_{s.labels['cache_tier']}"
                else:
                    continue
                out[key] = out.get(key, 0.0) + s.value
    return out


def delta(before: dict, after: dict) -> dict:
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    batches = d.get("instgenie_worker_batch_size_count", 0.0)
    edits = d.get("edits_host", 0.0) + d.get("edits_store", 0.0)
    return {"steps": batches,
            "mean_batch_size": d.get("instgenie_worker_batch_size_sum", 0.0) / batches if batches else None,
            "mean_tokens_per_step": d.get("instgenie_worker_step_tokens_sum", 0.0) / batches if batches else None,
            "host_tier_share": d.get("edits_host", 0.0) / edits if edits else None}


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m loadtest.loadgen", description=__doc__.split("\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="the gateway's host:port (loopback only)")
    where.add_argument("--local-mesh", type=int, metavar="WORKERS", help="start a local mesh with this many workers")
    ap.add_argument("--api-key", default="", help="API key (with --target)")
    ap.add_argument("--metrics", default="", help="comma-separated host:port of the mesh's /metrics (with --target)")
    ap.add_argument("--model", default="", help="model to edit with (default: the first served)")
    ap.add_argument("--rates", default="2,4,8", help="offered loads, edits/s, comma-separated")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per load")
    ap.add_argument("--max-requests", type=int, default=500, help="edits per load at most")
    ap.add_argument("--drain-seconds", type=float, default=120.0, help="wait this long for answers after arrivals")
    ap.add_argument("--deadline", type=float, default=120.0, help="each edit's deadline, seconds")
    ap.add_argument("--templates", type=int, default=8, help="templates to register and edit")
    ap.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of template popularity (0: uniform)")
    ap.add_argument("--dist", default="production", choices=DISTRIBUTIONS, help="mask-ratio distribution")
    ap.add_argument("--cell", type=int, default=0, help="mask cell in pixels (0: 2 below 128 px, else 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/loadtest", help="report path prefix (.json, .md, .png are added)")
    return ap.parse_args(argv)


async def run(args: argparse.Namespace, target: str, api_key: str, metrics: list[str]) -> dict:
    gen = LoadGenerator(target, api_key, deadline=args.deadline)
    try:
        model = await gen.model(args.model)
        cell = args.cell or (2 if min(model.width, model.height) < 128 else 16)
        templates = await gen.register(model, args.templates, args.seed)
        levels = []
        for index, rate in enumerate(float(r) for r in args.rates.split(",")):
            before = scrape(metrics) if metrics else {}
            started = time.monotonic()
            records = await gen.level(index, rate, templates, model, duration=args.duration,
                                      max_requests=args.max_requests, drain=args.drain_seconds, dist=args.dist,
                                      zipf=args.zipf, cell=cell, seed=args.seed)
            wall = time.monotonic() - started
            engine = delta(before, scrape(metrics)) if metrics else {}
            levels.append({"rate": rate, "wall_seconds": wall, "engine": engine,
                           "records": [asdict(r) for r in records]})
            print(f"offered {rate:g}/s: {len(records)} edits in {wall:.1f}s", flush=True)
    finally:
        await gen.close()
    return {"config": {k: v for k, v in vars(args).items() if k not in ("api_key",)}, "model": model.name,
            "model_size": [model.width, model.height], "default_steps": model.default_steps,
            "templates": len(templates), "cell": cell, "levels": levels}


def main(argv=None) -> int:
    from .loadreport import write_report

    args = parse_args(argv)
    mesh = None
    try:
        if args.local_mesh is not None:
            from instgenie.services.local.mesh import LocalMesh, MeshConfig

            state = Path(tempfile.mkdtemp(prefix="loadgen-"))
            mesh = LocalMesh(MeshConfig(state_dir=state, workers=args.local_mesh, http_port=None)).start()
            target, api_key = mesh.gateway.address, mesh.api_key
            metrics = [p.metrics for p in mesh.workers if p.metrics]
        else:
            if not args.api_key:
                raise SystemExit("--api-key is required with --target")
            target, api_key = args.target, args.api_key
            metrics = [m for m in args.metrics.split(",") if m]
        result = asyncio.run(run(args, target, api_key, metrics))
    finally:
        if mesh is not None:
            mesh.stop()
    paths = write_report(result, args.out)
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
