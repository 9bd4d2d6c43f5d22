"""`instgenie up`: start the local mesh, register a demo template, run one edit through the CLI, then serve
until Ctrl-C and stop every process it started."""
from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .mesh import LocalMesh, MeshConfig, MeshError, instgenie_home


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="instgenie up", description=__doc__)
    ap.add_argument("--workers", type=int, default=2, help="CPU workers to start (default 2)")
    ap.add_argument("--model", default="digits", help="model preset or directory for the workers (default digits)")
    ap.add_argument("--gateway-port", type=int, default=50051)
    ap.add_argument("--scheduler-port", type=int, default=50052)
    ap.add_argument("--http-port", type=int, default=8080,
                    help="the gateway's HTTP front: OpenAI-compatible API and web page (default 8080; -1: none)")
    ap.add_argument("--state-dir", default="var/local", help="logs, S3 data and demo files (default var/local)")
    ap.add_argument("--no-demo", action="store_true", help="skip the demo template and edit")
    ap.add_argument("--exit-after-demo", action="store_true", help="stop everything once the demo edit is done")
    return ap.parse_args(argv)


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def demo(mesh: LocalMesh, out: Path) -> str:
    """Register a handwritten 3 as a template and repaint its right half as an 8 through the CLI."""
    import grpc

    from instgenie.engine.latents import tensor_to_image
    from instgenie.engine.models.digits import load_digits_dataset
    from instgenie.gateway.v1 import edit_service_pb2 as pb
    from instgenie.gateway.v1 import edit_service_pb2_grpc as pb_grpc

    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_digits_dataset("test")
    index = int(np.flatnonzero(labels.numpy() == 3)[0])
    tensor_to_image(images[index]).save(out / "template.png")
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, :8] = 255  # the left half: where an 8 closes the loops a 3 leaves open
    Image.fromarray(mask).save(out / "mask.png")
    metadata = (("authorization", f"Bearer {mesh.api_key}"),)
    with grpc.insecure_channel(mesh.gateway.address) as channel:
        stub = pb_grpc.EditServiceStub(channel)
        op = stub.CreateTemplate(pb.CreateTemplateRequest(image=(out / "template.png").read_bytes(), prompt="3",
                                                          name="demo: a handwritten 3"),
                                 metadata=metadata, timeout=30).operation
        op = stub.WaitOperation(pb.WaitOperationRequest(name=op.name), metadata=metadata, timeout=300).operation
        if op.HasField("error"):
            raise MeshError(f"demo template failed: {op.error.message}")
        meta = pb.CreateTemplateMetadata()
        op.metadata.Unpack(meta)
    template_id = meta.template_id
    _say(f"registered demo template {template_id} (a handwritten 3, 20 steps)")
    cli = shutil.which("instgenie") or str(Path(sys.executable).with_name("instgenie"))
    cmd = [cli, "edit", "--template", template_id, "--mask", str(out / "mask.png"), "--prompt", "8",
           "--seed", "1", "--out", str(out / "edited.png")]
    _say("$ " + " ".join(["instgenie", *cmd[1:]]))
    subprocess.run(cmd, check=True)
    _side_by_side(out)
    return template_id


def _side_by_side(out: Path) -> None:
    tiles = [Image.open(out / n).convert("RGB").resize((128, 128), Image.NEAREST)
             for n in ("template.png", "mask.png", "edited.png")]
    grid = Image.new("RGB", (128 * 3 + 16, 128), "white")
    for i, tile in enumerate(tiles):
        grid.paste(tile, (i * (128 + 8), 0))
    grid.save(out / "demo.png")


def run(argv=None) -> int:
    args = parse_args(argv)
    config = MeshConfig(state_dir=Path(args.state_dir), gateway_port=args.gateway_port,
                        scheduler_port=args.scheduler_port, http_port=None if args.http_port < 0 else args.http_port,
                        workers=args.workers, model=args.model, publish=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    mesh = LocalMesh(config)
    _say(f"starting the local mesh in {mesh.state} (S3 server, scheduler, {args.workers} workers, gateway) ...")
    t0 = time.monotonic()
    try:
        mesh.start()
        _say(f"up in {time.monotonic() - t0:.1f}s: gateway {mesh.gateway.address}, scheduler {mesh.scheduler.address}, "
             f"S3 {mesh.s3.endpoint}, workers " + ", ".join(w.address for w in mesh.workers))
        _say(f"logs: {mesh.state / 'logs'}; connection for the CLI: {instgenie_home() / 'local.json'}")
        _say("metrics (Prometheus): " + ", ".join(f"{p.name} http://{p.metrics}/metrics" for p in mesh.processes()
                                                  if p.metrics))
        prom = mesh.state / "prometheus.yml"
        prom.write_text(mesh.prometheus_config())
        _say(f"  scrape them all: prometheus --config.file={prom} --storage.tsdb.path={mesh.state / 'prometheus'} "
             "--web.listen-address=127.0.0.1:9090")
        if mesh.http_url:
            _say(f"web page: {mesh.http_url}/web/  (API key {mesh.api_key}); OpenAI-compatible API: "
                 f"{mesh.http_url}/v1")
        if not args.no_demo and not stop.is_set():
            template_id = demo(mesh, mesh.state / "demo")
            _say(f"demo pictures: {mesh.state / 'demo'} (demo.png: template | mask | edit)")
        else:
            template_id = "TEMPLATE_ID"
        _say("\nTry next (in another terminal):")
        _say("  instgenie models")
        _say("  instgenie templates list")
        _say(f"  instgenie edit --template {template_id} --mask {mesh.state / 'demo' / 'mask.png'} --prompt 7 "
             "--out out/edit.png")
        _say("  instgenie templates create IMAGE.png --prompt 5     # a 16x16 image for the digits model")
        _say("  instgenie status")
        if mesh.http_url:
            _say(f"  open {mesh.http_url}/web/ and paint a mask over a template")
        if args.exit_after_demo:
            return 0
        _say("\nserving until Ctrl-C ...")
        while not stop.wait(1.0):
            for p in mesh.processes():
                if not p.alive() and not getattr(p, "_reported", False):
                    p._reported = True
                    _say(f"warning: {p.name} exited with code {p.popen.returncode}; see {p.log}")
        return 0
    except (MeshError, subprocess.CalledProcessError) as exc:
        _say(f"error: {exc}")
        return 1
    finally:
        _say("stopping ...")
        mesh.stop()
        _say("stopped; no process left behind")
