"""Runs the gateway: `python -m instgenie.services.gateway --scheduler 127.0.0.1:50052 --s3-endpoint ...`."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from instgenie.engine.images import ImageLimits
from instgenie.gateway.v1 import edit_service_pb2 as pb
from instgenie.gateway.v1 import edit_service_pb2_grpc as pb_grpc

from ..common.config import add_flag, add_server_flags, add_store_flags, open_store, server_config
from ..common.logs import setup_logging
from ..common.server import ServiceHost
from ..common.telemetry import setup_telemetry
from .auth import ApiKeys
from .service import GatewayConfig, GatewayService
from .templates import TemplateRecords
from .validation import Limits

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EditService"].full_name


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="instgenie-gateway", description=__doc__)
    add_server_flags(ap, listen="127.0.0.1:50051")
    add_store_flags(ap)
    add_flag(ap, "--scheduler", default="127.0.0.1:50052", help="host:port of the scheduler")
    add_flag(ap, "--api-keys-file", default="", help="JSON file of tenants and their API keys (see auth.py)")
    add_flag(ap, "--max-image-bytes", default=ImageLimits().max_bytes, type=int, help="largest accepted image/mask")
    add_flag(ap, "--max-image-pixels", default=ImageLimits().max_pixels, type=int,
             help="largest accepted width x height (checked from the header, before decoding)")
    add_flag(ap, "--edit-deadline", default=300.0, type=float, help="seconds an edit may take when the call sets none")
    add_flag(ap, "--keepalive-seconds", default=5.0, type=float, help="StreamEdit keepalive interval")
    add_flag(ap, "--http-listen", default="", help="host:port of the HTTP front (OpenAI-compatible /v1/images/edits, "
             "the web page at /web/); empty: no HTTP (port 0: any free port)")
    add_flag(ap, "--result-url-ttl", default=3600.0, type=float,
             help="seconds a response_format=url result stays downloadable")
    return ap.parse_args(argv)


class GatewayHost(ServiceHost):
    """ServiceHost whose ready file also names the HTTP front's address, and which remembers its readiness."""

    http_address = ""
    serving = False

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving
        await super().set_serving(serving)
        if self.config.ready_file and self.http_address:
            # Rewritten whole after the base class wrote it: a reader may briefly see it without "http", so
            # readers that need the HTTP address wait for the key (services/local/mesh.py does).
            path = Path(self.config.ready_file)
            info = json.loads(path.read_text())
            info["http"] = self.http_address
            tmp = path.with_suffix(path.suffix + ".http.tmp")
            tmp.write_text(json.dumps(info))
            os.replace(tmp, path)


async def serve(args: argparse.Namespace) -> None:
    keys = ApiKeys.load(args.api_keys_file or None, os.environ.get("INSTGENIE_API_KEYS"))
    if not len(keys):
        raise SystemExit("no API keys: give --api-keys-file or INSTGENIE_API_KEYS=tenant:key,...")
    telemetry = setup_telemetry("gateway", args)
    limits = Limits(image=ImageLimits(max_bytes=args.max_image_bytes, max_pixels=args.max_image_pixels))
    config = GatewayConfig(scheduler=args.scheduler, limits=limits, default_edit_deadline=args.edit_deadline,
                           keepalive_seconds=args.keepalive_seconds)
    service = GatewayService(config, keys, TemplateRecords(open_store(args)))
    host = GatewayHost("gateway", server_config(args), interceptors=telemetry.server_interceptors())
    host.ready_extra.update(telemetry.ready_info())
    host.add_service(pb_grpc.add_EditServiceServicer_to_server, service, SERVICE_NAME)
    http = None
    if args.http_listen:
        from .http.app import build_app, route_span_details
        from .http.server import HttpFront

        app = build_app(service, ready=lambda: host.serving, result_ttl=args.result_url_ttl)
        app = telemetry.wrap_asgi(app, span_details=route_span_details(app))
        http = HttpFront(app, args.http_listen, grace_seconds=min(args.grace_seconds, 5.0))
        host.http_address = await http.start()  # before the ready file is first written
    host.install_signal_handlers()
    await host.start()
    readiness = asyncio.ensure_future(follow_scheduler(host, args.scheduler))
    await host.wait_for_stop()
    readiness.cancel()
    if http is not None:
        await http.stop()
    await host.shutdown()
    await service.close()
    telemetry.shutdown()


async def follow_scheduler(host: ServiceHost, scheduler: str, interval: float = 1.0) -> None:
    """Real readiness: SERVING while the scheduler answers its health check, NOT_SERVING otherwise (a gateway
    that cannot place work should not get traffic from a load balancer)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    serving = None
    async with grpc.aio.insecure_channel(scheduler) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=interval)
                ok = resp.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError:
                ok = False
            if ok != serving:
                serving = ok
                await host.set_serving(ok)
                logging.getLogger(__name__).log(logging.INFO if ok else logging.WARNING,
                                                "scheduler %s %s", scheduler, "reachable: serving" if ok else
                                                "unreachable: not serving")
            await asyncio.sleep(interval)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging("gateway", args.log_level)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
