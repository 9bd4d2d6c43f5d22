"""An observed mesh for the telemetry tests: the local mesh with metrics on every process and traces sent over
OTLP/gRPC to a collector in the test process (a real OTLP TraceService server on a loopback port)."""
from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class OtlpSink(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span it is sent as (service.name, span) pairs."""

    def __init__(self):
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    self.spans.extend((attrs.get("service.name", ""), span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self) -> list[tuple[str, object]]:
        with self.lock:
            return list(self.spans)


@pytest.fixture(scope="session")
def otlp_sink():
    sink = OtlpSink()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    sink.endpoint = f"127.0.0.1:{port}"
    yield sink
    server.stop(None)


@pytest.fixture(scope="session")
def observed_mesh(tmp_path_factory, otlp_sink):
    """Scheduler, two workers and the gateway (gRPC and HTTP) with /metrics each, exporting spans every 100 ms."""
    from tests.services.mesh_helpers import start_mesh

    mesh = start_mesh(tmp_path_factory.mktemp("observed"), otlp_endpoint=otlp_sink.endpoint,
                      env={"OTEL_BSP_SCHEDULE_DELAY": "100"})
    yield mesh
    mesh.stop()
