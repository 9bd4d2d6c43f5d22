"""Runs the scheduler: `python -m instgenie.services.scheduler --listen 127.0.0.1:50052`."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from instgenie.scheduler.v1 import scheduler_service_pb2 as pb
from instgenie.scheduler.v1 import scheduler_service_pb2_grpc as pb_grpc

from ..common.config import add_flag, add_server_flags, server_config
from ..common.logs import setup_logging
from ..common.server import ServiceHost
from ..common.telemetry import setup_telemetry
from .costmodel import AnalyticalCostModel
from .placement import POLICIES, make_policy
from .profile import load_profiles
from .service import SchedulerConfig, SchedulerService

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SchedulerService"].full_name


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="instgenie-scheduler", description=__doc__)
    add_server_flags(ap, listen="127.0.0.1:50052")
    add_flag(ap, "--policy", default="predicted-finish", choices=sorted(POLICIES), help="placement policy")
    add_flag(ap, "--max-in-flight", default=256, type=int, help="requests admitted at once over the cluster")
    add_flag(ap, "--capacity-per-slot", default=4, type=int,
             help="a worker holds at most max_batch_size x this many requests")
    add_flag(ap, "--report-interval", default=0.5, type=float, help="seconds between worker load reports")
    add_flag(ap, "--lease", default=3.0, type=float, help="seconds without a report before a worker is retired")
    add_flag(ap, "--flops-per-second", default=2.0e11, type=float, help="analytical cost model: effective FLOP/s")
    add_flag(ap, "--step-overhead", default=0.005, type=float, help="analytical cost model: seconds per step")
    add_flag(ap, "--store-bandwidth", default=500e6, type=float,
             help="analytical cost model: object store -> host bytes/s")
    add_flag(ap, "--profile", default="",
             help="device profiles from `instgenie profile` (files or directories of *.json, comma-separated); "
                  "a worker is predicted with the one it announces, else one of its model and device kind, "
                  "else the analytical model")
    add_flag(ap, "--affinity-slack", default=0.25, type=float,
             help="predicted-finish: a worker holding the template wins when its prediction is within this "
                  "share of the best")
    add_flag(ap, "--correction", default="on", choices=["on", "off"],
             help="scale each worker's predicted step times by its measured speed")
    add_flag(ap, "--warm-templates", default="on", choices=["on", "off"],
             help="ask workers to warm hot templates that too few of them hold")
    add_flag(ap, "--discover-workers", action="store_true",
             help="list and watch worker pods in Kubernetes: a pod that stops being ready gets no new work at once")
    add_flag(ap, "--discover-selector", default="app.kubernetes.io/component=worker",
             help="label selector of the worker pods (the pod name is the worker id)")
    add_flag(ap, "--discover-namespace", default="", help="namespace of the worker pods (default: the scheduler's)")
    add_flag(ap, "--discover-port", default="grpc", help="the workers' gRPC container port (a name or a number)")
    add_flag(ap, "--kubeconfig", default="",
             help="discovery outside a cluster: this kubeconfig instead of the pod's service account")
    return ap.parse_args(argv)


def start_discovery(args: argparse.Namespace, service: SchedulerService, api=None):
    """WorkerPodDiscovery feeding `service` on the running loop (its callbacks come from a thread)."""
    from .discovery import WorkerPodDiscovery

    loop = asyncio.get_running_loop()
    port = int(args.discover_port) if str(args.discover_port).isdigit() else args.discover_port
    on_ready = lambda name, address: loop.call_soon_threadsafe(service.pod_ready, name, address)  # noqa: E731
    on_gone = lambda name: loop.call_soon_threadsafe(service.pod_gone, name)  # noqa: E731
    if api is None and not args.kubeconfig:
        discovery = WorkerPodDiscovery.in_cluster(args.discover_selector, on_ready, on_gone,
                                                  namespace=args.discover_namespace or None, port=port)
    else:
        if api is None:
            from kubernetes import client, config

            api = client.CoreV1Api(config.new_client_from_config(config_file=args.kubeconfig))
        discovery = WorkerPodDiscovery(api, args.discover_namespace or "default", args.discover_selector, on_ready,
                                       on_gone, port=port)
    discovery.start()
    logging.getLogger(__name__).info("discovering worker pods %s in namespace %s", args.discover_selector,
                                     discovery.namespace)
    return discovery


async def serve(args: argparse.Namespace) -> None:
    cost = AnalyticalCostModel(flops_per_second=args.flops_per_second, step_overhead_seconds=args.step_overhead,
                               store_bandwidth_bytes_per_second=args.store_bandwidth)
    config = SchedulerConfig(report_interval=args.report_interval, lease=args.lease,
                             max_in_flight=args.max_in_flight, capacity_per_slot=args.capacity_per_slot,
                             affinity_slack=args.affinity_slack, correction=args.correction == "on",
                             warm_templates=args.warm_templates == "on")
    profiles = load_profiles(args.profile) if args.profile else []
    for p in profiles:
        logging.getLogger(__name__).info("cost-model profile %s loaded (compute R² %.4f)", p.profile_id,
                                         p.compute_r2)
    telemetry = setup_telemetry("scheduler", args)
    service = SchedulerService(config, make_policy(args.policy, cost, args.affinity_slack), profiles=profiles)
    host = ServiceHost("scheduler", server_config(args), interceptors=telemetry.server_interceptors())
    host.ready_extra.update(telemetry.ready_info())
    host.add_service(pb_grpc.add_SchedulerServiceServicer_to_server, service, SERVICE_NAME)
    host.install_signal_handlers()
    await host.start()
    service.start()
    discovery = start_discovery(args, service) if args.discover_workers else None
    await host.set_serving(True)
    await host.wait_for_stop()
    if discovery is not None:
        discovery.stop()
    await host.shutdown()
    await service.close()
    telemetry.shutdown()


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging("scheduler", args.log_level)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
