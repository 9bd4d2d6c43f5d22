"""What the service mesh costs: the same edit in one process and through client -> gateway -> scheduler -> worker.

    python -m loadtest.mesh_bench --json out/mesh_bench.json --md out/mesh_bench.md

1. Added latency with the real model (the trained digits model, 20 steps, one worker, one torch thread): the
   same edits alternately through `EngineLoop` in this process and through the mesh on loopback; p50/p95 of
   each and of the per-edit difference.
2. The mesh alone, with the stand-in engine whose denoising steps take no time (`--engine instant`): sequential
   latency beside the same stand-in in process, then the requests/s ceiling at several client concurrencies.
3. Where the added time goes: the same stand-in edits sent straight to the worker, to the scheduler (with the
   request the gateway would build) and to the gateway, alternately; each hop's cost is a difference of p50s.
Everything runs on this machine, so the mesh's four processes and the client share its cores; target: <= 5 ms
p50 added per edit.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
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
from instgenie.worker.v1 import worker_service_pb2 as wpb
from instgenie.worker.v1 import worker_service_pb2_grpc as wpb_grpc
from instgenie.services.local.mesh import LocalMesh, MeshConfig

TENANT, KEY = "bench", "bench-key-0123456789"
MD = (("authorization", f"Bearer {KEY}"),)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summary(seconds: list[float]) -> dict:
    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "p50_ms": pct(ms, 50), "p95_ms": pct(ms, 95), "mean_ms": statistics.fmean(ms) if ms else 0}


def inputs():
    import io

    from PIL import Image

    from instgenie.engine.latents import tensor_to_image
    from instgenie.engine.models.digits import load_digits_dataset

    images, labels = load_digits_dataset("test")
    template = np.asarray(tensor_to_image(images[int(np.flatnonzero(labels.numpy() == 3)[0])]))
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, :8] = 255

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    return template, mask, png(template), png(mask)


#: serve /metrics from every process of the benched mesh (`--no-metrics` measures what they cost)
METRICS = True


def start_mesh(state: Path, engine: str) -> LocalMesh:
    return LocalMesh(MeshConfig(state_dir=state, workers=1, engine=engine, tenants={TENANT: KEY},
                                torch_threads=1, max_batch_size=8, metrics=METRICS)).start()


def create_template(stub, image_png: bytes) -> str:
    op = stub.CreateTemplate(pb.CreateTemplateRequest(image=image_png, prompt="3"), metadata=MD, timeout=60).operation
    op = stub.WaitOperation(pb.WaitOperationRequest(name=op.name), metadata=MD, timeout=300).operation
    meta = pb.CreateTemplateMetadata()
    op.metadata.Unpack(meta)
    if op.HasField("error"):
        raise RuntimeError(op.error.message)
    return meta.template_id


def in_process_loop(engine: str, template: np.ndarray, store_dir: Path):
    import torch

    from instgenie.engine.editor import Editor
    from instgenie.engine.models.loader import preset_model
    from instgenie.engine.serving.loop import EngineLoop
    from instgenie.engine.template_cache import DirectoryBlobStore, TemplateStore
    from instgenie.services.worker.standin import InstantEditor

    torch.set_num_threads(1)  # as the mesh's worker
    cls = InstantEditor if engine == "instant" else Editor
    editor = cls(preset_model("digits"), TemplateStore(DirectoryBlobStore(store_dir)))
    tpl = editor.register_template(template, "3", seed=0)
    return EngineLoop(editor, max_batch_size=8), tpl.template_id


def paired(engine: str, edits: int, workdir: Path) -> dict:
    """The same edits alternately in process and through the mesh; latencies and their per-edit difference."""
    from instgenie.engine.request import EditRequest

    template, mask, template_png, mask_png = inputs()
    loop, local_id = in_process_loop(engine, template, workdir / f"store-{engine}")
    mesh = start_mesh(workdir / f"mesh-{engine}", engine)
    local, remote = [], []
    try:
        with grpc.insecure_channel(mesh.gateway.address) as ch:
            stub = pb_grpc.EditServiceStub(ch)
            mesh_id = create_template(stub, template_png)
            for i in range(edits + 5):  # the first 5 of each warm up
                t0 = time.perf_counter()
                loop.submit(EditRequest(template_id=local_id, mask=mask, prompt="8", seed=i,
                                        request_id=f"local-{i}")).result(60)
                t1 = time.perf_counter()
                stub.Edit(pb.EditRequest(template_id=mesh_id, mask=mask_png, prompt="8", seed=i,
                                         request_id=f"mesh-{i}"), metadata=MD, timeout=60)
                t2 = time.perf_counter()
                if i >= 5:
                    local.append(t1 - t0)
                    remote.append(t2 - t1)
    finally:
        mesh.stop()
        loop.stop(drain=False)
    diff = [r - loc for r, loc in zip(remote, local)]
    return {"engine": engine, "in_process": summary(local), "mesh": summary(remote), "added": summary(diff)}


async def _hammer(address: str, template_id: str, mask_png: bytes, concurrency: int, seconds: float) -> dict:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.EditServiceStub(ch)
        latencies, errors = [], {}
        end = time.perf_counter() + seconds
        counter = itertools.count()

        async def client():
            nonlocal errors
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                try:
                    await stub.Edit(pb.EditRequest(template_id=template_id, mask=mask_png, prompt="8",
                                                   seed=next(counter), request_id=uuid.uuid4().hex),
                                    metadata=MD, timeout=60)
                    latencies.append(time.perf_counter() - t0)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests_per_second": len(latencies) / elapsed,
            "errors": sum(errors.values()), "errors_by_status": errors, **summary(latencies)}


def ceiling(concurrencies: list[int], seconds: float, workdir: Path) -> list[dict]:
    template, mask, template_png, mask_png = inputs()
    mesh = start_mesh(workdir / "mesh-ceiling", "instant")
    try:
        with grpc.insecure_channel(mesh.gateway.address) as ch:
            template_id = create_template(pb_grpc.EditServiceStub(ch), template_png)
        asyncio.run(_hammer(mesh.gateway.address, template_id, mask_png, 4, 2.0))  # warm up
        return [asyncio.run(_hammer(mesh.gateway.address, template_id, mask_png, c, seconds)) for c in concurrencies]
    finally:
        mesh.stop()


def _until_result(call) -> None:
    for msg in call:
        event = msg.worker_event if isinstance(msg, spb.EditResponse) else msg
        if isinstance(msg, spb.EditResponse) and msg.WhichOneof("event") != "worker_event":
            continue
        if event.WhichOneof("event") == "result":
            return
    raise RuntimeError("the stream ended without a result")


def hops(edits: int, workdir: Path) -> dict:
    """Sequential stand-in edits straight to the worker, to the scheduler and to the gateway, interleaved."""
    template, mask, template_png, mask_png = inputs()
    mesh = start_mesh(workdir / "mesh-hops", "instant")
    times: dict[str, list[float]] = {"worker": [], "scheduler": [], "gateway": []}
    try:
        with grpc.insecure_channel(mesh.gateway.address) as gch, \
                grpc.insecure_channel(mesh.scheduler.address) as sch, \
                grpc.insecure_channel(mesh.workers[0].address) as wch:
            gateway = pb_grpc.EditServiceStub(gch)
            scheduler = spb_grpc.SchedulerServiceStub(sch)
            worker = wpb_grpc.WorkerServiceStub(wch)
            template_id = create_template(gateway, template_png)
            tpl = gateway.GetTemplate(pb.GetTemplateRequest(template_id=template_id), metadata=MD, timeout=10).template
            tokens = int((mask > 0).sum())  # one token per pixel on the digits model (patch 1, latent /1)

            def job(i: int, hop: str) -> wpb.EditRequest:
                return wpb.EditRequest(request_id=f"{TENANT}-{hop}-{i}", template_id=template_id, mask=mask_png,
                                       prompt="8", seed=i, steps=tpl.steps, tenant=TENANT, progress_interval_ms=1000)

            for i in range(edits + 5):  # the first 5 of each warm up
                t0 = time.perf_counter()
                _until_result(worker.Edit(job(i, "w"), timeout=60))
                t1 = time.perf_counter()
                _until_result(scheduler.Edit(spb.EditRequest(
                    edit=job(i, "s"), tenant=TENANT, model=tpl.model, masked_tokens=tokens,
                    cache_bytes=tpl.cache_bytes, steps=tpl.steps), timeout=60))
                t2 = time.perf_counter()
                gateway.Edit(pb.EditRequest(template_id=template_id, mask=mask_png, prompt="8", seed=i,
                                            request_id=f"g-{i}"), metadata=MD, timeout=60)
                t3 = time.perf_counter()
                if i >= 5:
                    for hop, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                        times[hop].append(dt)
    finally:
        mesh.stop()
    out = {hop: summary(ts) for hop, ts in times.items()}
    out["scheduler_hop_p50_ms"] = out["scheduler"]["p50_ms"] - out["worker"]["p50_ms"]
    out["gateway_hop_p50_ms"] = out["gateway"]["p50_ms"] - out["scheduler"]["p50_ms"]
    return out


def markdown(result: dict) -> str:
    lines = ["| engine | in process p50 / p95 (ms) | through the mesh p50 / p95 (ms) | added p50 / p95 (ms) |",
             "|---|---|---|---|"]
    for row in result["latency"]:
        lines.append(f"| {row['engine']} | {row['in_process']['p50_ms']:.1f} / {row['in_process']['p95_ms']:.1f} | "
                     f"{row['mesh']['p50_ms']:.1f} / {row['mesh']['p95_ms']:.1f} | "
                     f"**{row['added']['p50_ms']:.2f}** / {row['added']['p95_ms']:.2f} |")
    lines += ["", "| client concurrency | edits/s | p50 (ms) | p95 (ms) | errors |", "|---|---|---|---|---|"]
    for row in result["ceiling"]:
        errors = ", ".join(f"{n} {code}" for code, n in sorted(row["errors_by_status"].items())) or "0"
        lines.append(f"| {row['concurrency']} | {row['requests_per_second']:.0f} | {row['p50_ms']:.1f} | "
                     f"{row['p95_ms']:.1f} | {errors} |")
    if "hops" in result:
        h = result["hops"]
        lines += ["", "| stand-in edit sent to | p50 (ms) | p95 (ms) |", "|---|---|---|"]
        lines += [f"| {hop} | {h[hop]['p50_ms']:.2f} | {h[hop]['p95_ms']:.2f} |" for hop in ("worker", "scheduler",
                                                                                            "gateway")]
        lines += ["", f"Scheduler hop {h['scheduler_hop_p50_ms']:.2f} ms, gateway hop {h['gateway_hop_p50_ms']:.2f} ms "
                  "(differences of p50s)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edits", type=int, default=100, help="paired edits per engine")
    ap.add_argument("--concurrency", default="1,8,32", help="client concurrencies for the ceiling")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds per concurrency level")
    ap.add_argument("--no-metrics", action="store_true", help="the mesh's processes serve no Prometheus metrics")
    ap.add_argument("--json", default="out/mesh_bench.json")
    ap.add_argument("--md", default="out/mesh_bench.md")
    args = ap.parse_args(argv)
    global METRICS
    METRICS = not args.no_metrics
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
        work = Path(tmp)
        result = {"latency": [paired("real", args.edits, work), paired("instant", args.edits, work)],
                  "ceiling": ceiling([int(c) for c in args.concurrency.split(",")], args.seconds, work),
                  "hops": hops(args.edits, work), "metrics": METRICS}
    for path, text in ((args.json, json.dumps(result, indent=2)), (args.md, markdown(result))):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    print(json.dumps(result, indent=2))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
