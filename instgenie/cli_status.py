"""`instgenie status`: the scheduler's view of the cluster (workers, their load, admission counters)."""
from __future__ import annotations

import random

import grpc
from google.protobuf import json_format
from rich.console import Group
from rich.table import Table
from rich.text import Text

from instgenie.client import calls
from instgenie.client.retry import Deadline, RetryPolicy
from instgenie.client.sync import call_unary
from instgenie.scheduler.v1 import scheduler_service_pb2 as pb
from instgenie.scheduler.v1 import scheduler_service_pb2_grpc as pb_grpc


def fetch_cluster_status(address: str, timeout: float = 30.0, *, tls: bool = False) -> pb.GetClusterStatusResponse:
    """One GetClusterStatus call (a read, so UNAVAILABLE is retried); failures raise typed InstGenIEErrors."""
    options = calls.channel_options()
    channel = (grpc.secure_channel(address, calls.channel_credentials(None), options) if tls
               else grpc.insecure_channel(address, options))
    with channel:
        stub = pb_grpc.SchedulerServiceStub(channel)
        return call_unary(stub.GetClusterStatus, pb.GetClusterStatusRequest(), metadata=(),
                          deadline=Deadline(timeout), policy=RetryPolicy(), idempotent=True, rng=random.Random())


def status_as_dict(status: pb.GetClusterStatusResponse) -> dict:
    return json_format.MessageToDict(status, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def status_view(status: pb.GetClusterStatusResponse) -> Group:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("WORKER", "ADDRESS", "MODEL", "RUNNING", "WAITING", "PREPARING", "RESIDENT", "IN FLIGHT",
                   "REPORT AGE"):
        table.add_column(column, no_wrap=True)
    for entry in status.workers:
        worker, load = entry.worker, entry.load
        name = worker.worker_id + (" (draining)" if load.draining else "")
        table.add_row(name, worker.address, worker.model.model_id, str(len(load.running)), str(len(load.waiting)),
                      str(load.preparing), str(len(load.resident_templates)), str(entry.in_flight),
                      f"{entry.report_age_seconds:.1f} s")
    counters = Text(
        f"in flight {status.in_flight}/{status.max_in_flight or '-'}   policy {status.placement_policy or '-'}   "
        f"placed {status.edits_placed}   re-placed {status.edits_replaced}   rejected {status.edits_rejected}")
    if not status.workers:
        return Group(Text("no workers registered"), counters)
    return Group(table, counters)
