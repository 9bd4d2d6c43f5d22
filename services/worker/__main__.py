"""Runs a worker: `python -m instgenie.services.worker --scheduler 127.0.0.1:50052 --s3-endpoint ...`."""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys

import torch

from instgenie.scheduler.v1 import scheduler_service_pb2 as spb
from instgenie.worker.v1 import worker_service_pb2 as wpb
from instgenie.worker.v1 import worker_service_pb2_grpc as wpb_grpc

from instgenie.engine.images import ImageLimits

from ..common.config import add_flag, add_server_flags, add_store_flags, open_store, server_config
from ..common.logs import setup_logging
from ..common.server import ServiceHost
from ..common.telemetry import setup_telemetry
from ..common.throttle import ThrottledStore
from .metrics import WorkerMetrics
from .reporter import Reporter
from .runtime import WorkerConfig, WorkerRuntime
from .service import WorkerService

SERVICE_NAME = wpb.DESCRIPTOR.services_by_name["WorkerService"].full_name


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="instgenie-worker", description=__doc__)
    add_server_flags(ap, listen="127.0.0.1:0")
    add_store_flags(ap)
    add_flag(ap, "--scheduler", default="", help="host:port of the scheduler to register with ('' = standalone)")
    add_flag(ap, "--advertise", default="", help="host:port the scheduler dials (default: the bound address)")
    add_flag(ap, "--worker-id", default=f"{socket.gethostname()}-{os.getpid()}", help="unique worker name")
    add_flag(ap, "--model", default="digits", help="preset (digits, flux-tiny, flux-small, ...) or model directory")
    add_flag(ap, "--models-dir", default="var/models", help="where presets are built and cached")
    add_flag(ap, "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    add_flag(ap, "--max-batch-size", default=8, type=int, help="requests per denoising step")
    add_flag(ap, "--pre-workers", default=2, type=int, help="pre-processing threads")
    add_flag(ap, "--host-cache-bytes", default=2 * 1024 ** 3, type=int, help="host-memory budget for template caches")
    add_flag(ap, "--engine", default="real", choices=["real", "instant"],
             help="'instant' replaces the model by a stand-in whose steps take no time (mesh benchmark)")
    add_flag(ap, "--drain-timeout", default=120.0, type=float, help="seconds to finish running edits on SIGTERM")
    add_flag(ap, "--max-image-bytes", default=ImageLimits().max_bytes, type=int, help="largest accepted image/mask")
    add_flag(ap, "--torch-threads", default=0, type=int, help="torch intra-op threads (0: torch's default)")
    add_flag(ap, "--profile", default="", help="cost-model profile (`instgenie profile`) of this model and device "
             "kind, announced to the scheduler")
    add_flag(ap, "--store-read-mbps", default=0.0, type=float,
             help="cap on this worker's object-store reads in MB/s (cache warms share it; 0: no cap); announced "
             "to the scheduler, whose cost model prices cold templates at it")
    args = ap.parse_args(argv)
    if args.store_read_mbps < 0:
        ap.error(f"--store-read-mbps must be >= 0, got {args.store_read_mbps:g}")
    return args


async def serve(args: argparse.Namespace) -> None:
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    config = WorkerConfig(worker_id=args.worker_id, model=args.model, models_dir=args.models_dir,
                          device=args.device, max_batch_size=args.max_batch_size, pre_workers=args.pre_workers,
                          host_cache_bytes=args.host_cache_bytes, engine=args.engine, profile=args.profile)
    telemetry = setup_telemetry("worker", args, instance=args.worker_id)
    store = open_store(args)
    if args.store_read_mbps:
        store = ThrottledStore(store, args.store_read_mbps * 1e6)
    runtime = WorkerRuntime(config, store)
    service = WorkerService(runtime, ImageLimits(max_bytes=args.max_image_bytes))
    host = ServiceHost(f"worker {args.worker_id}", server_config(args), interceptors=telemetry.server_interceptors())
    host.ready_extra.update(telemetry.ready_info())
    host.add_service(wpb_grpc.add_WorkerServiceServicer_to_server, service, SERVICE_NAME)
    host.install_signal_handlers()
    address = await host.start()
    # NOT_SERVING until the model is loaded; a failed load keeps it so, with the reason in the log.
    loading = asyncio.get_running_loop().run_in_executor(None, runtime.load)
    stop = asyncio.ensure_future(host.wait_for_stop())
    await asyncio.wait({loading, stop}, return_when=asyncio.FIRST_COMPLETED)
    reporter = None
    if runtime.ready.is_set():
        service.metrics = WorkerMetrics(runtime)
        service.metrics.install()
        await host.set_serving(True)
        if args.scheduler:
            profile_id = runtime.profile_id()
            info = lambda: spb.WorkerInfo(  # noqa: E731 - rebuilt per registration
                worker_id=args.worker_id, address=args.advertise or address, model=runtime.model_info(),
                max_batch_size=args.max_batch_size, device=args.device, profile=profile_id,
                store_read_bytes_per_second=args.store_read_mbps * 1e6)
            reporter = Reporter(args.scheduler, info, lambda: runtime.load_report(
                draining=service.draining, registrations=service.registrations))
            reporting = asyncio.ensure_future(reporter.run())
    await stop

    async def drain():
        service.draining = True
        if reporter is not None:
            reporter.poke()
            await reporter.report_once()  # tell the scheduler at once: no new placements here
        await service.drain(args.drain_timeout)
        if reporter is not None:
            await reporter.deregister(args.worker_id)
            reporting.cancel()
            await reporter.close()

    await host.shutdown(drain)
    service.close()
    runtime.close()
    telemetry.shutdown()


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging("worker", args.log_level)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
