"""OpenTelemetry for every service: Prometheus metrics on one /metrics port per process, OTLP traces when configured.

    telemetry = setup_telemetry("scheduler", args)   # --metrics-listen, --otlp-endpoint
    host = ServiceHost(..., interceptors=telemetry.server_interceptors())
    ... meter().create_counter("instgenie_...")      # a no-op meter until (and unless) setup ran
    telemetry.shutdown()                             # flushes spans still queued

Metrics: the OpenTelemetry SDK's MeterProvider read by `opentelemetry-exporter-prometheus`, served by
prometheus_client's HTTP server on `--metrics-listen` (host:port, port 0 = any free port; empty = no
metrics). Every instrument is named `instgenie_...`; latency histograms get buckets from 50 ms to 10 min
(OpenTelemetry's default buckets stop at 10 s, too short for multi-second edits) through Views.

Traces: with `--otlp-endpoint` (an OTLP/gRPC collector), a TracerProvider with a batching exporter, and
gRPC's OpenTelemetry interceptors on the server and on the channels between services, which carry the trace
context in gRPC metadata (W3C traceparent). Health checks and the workers' load reports are left out.
Without an endpoint nothing is traced and no interceptor is installed: the hot path pays nothing. The
sampler follows the standard OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG variables (default: always on,
or the caller's decision when it sent one).
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field

from opentelemetry import metrics, trace

log = logging.getLogger(__name__)

#: seconds: queueing, inference and end-to-end latency of edits (sub-second on the digits model, minutes on a
#: busy GPU worker at FLUX size)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0,
                   180.0, 300.0, 600.0)
#: seconds of one denoising step of a batch
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
RATIO_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
#: |actual - predicted| / predicted of a placement's finish-time prediction
RELATIVE_ERROR_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)
#: |actual - predicted|, seconds
ERROR_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: every histogram of the services and its buckets (a View each; a histogram missing here would get
#: OpenTelemetry's default buckets, which stop at 10 s)
HISTOGRAM_BUCKETS = {
    "instgenie_request_e2e_seconds": LATENCY_BUCKETS,
    "instgenie_request_queue_seconds": LATENCY_BUCKETS,
    "instgenie_request_inference_seconds": LATENCY_BUCKETS,
    "instgenie_worker_queue_seconds": LATENCY_BUCKETS,
    "instgenie_request_mask_ratio": RATIO_BUCKETS,
    "instgenie_scheduler_prediction_abs_error_seconds": ERROR_SECONDS_BUCKETS,
    "instgenie_scheduler_prediction_relative_error": RELATIVE_ERROR_BUCKETS,
    "instgenie_worker_step_seconds": STEP_BUCKETS,
    "instgenie_worker_batch_size": BATCH_BUCKETS,
    "instgenie_worker_step_tokens": TOKEN_BUCKETS,
    "instgenie_worker_load_overlap_ratio": RATIO_BUCKETS,
}
#: the gRPC calls that are never traced: probes and the workers' periodic load reports
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")
UNTRACED_METHODS = ("ReportLoad", "RegisterWorker", "DeregisterWorker", "GetClusterStatus", "ListModels")
#: HTTP paths without spans: the probes (exact paths) and the web page's static files (a path prefix)
UNTRACED_HTTP = ("/healthz", "/readyz")
UNTRACED_HTTP_PREFIX = "/web"


def _untraced_path(path: str) -> bool:
    return path in UNTRACED_HTTP or path == UNTRACED_HTTP_PREFIX or path.startswith(UNTRACED_HTTP_PREFIX + "/")

METER_NAME = "instgenie"


def meter() -> metrics.Meter:
    """The services' meter (the global provider's: a no-op one unless `setup_telemetry` installed metrics)."""
    return metrics.get_meter(METER_NAME)


def tracer() -> trace.Tracer:
    return trace.get_tracer(METER_NAME)


def _views():
    from opentelemetry.sdk.metrics import Histogram
    from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

    return [View(instrument_type=Histogram, instrument_name=name,
                 aggregation=ExplicitBucketHistogramAggregation(list(buckets)))
            for name, buckets in HISTOGRAM_BUCKETS.items()]


@dataclass
class Telemetry:
    service: str
    #: host:port of /metrics ("" when metrics are off)
    metrics_address: str = ""
    tracing: bool = False
    _closers: list = field(default_factory=list)

    def server_interceptors(self) -> list:
        """The gRPC server's OpenTelemetry interceptor (none when tracing is off)."""
        if not self.tracing:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        return [aio_server_interceptor(filter_=_traced_filter())]

    def wrap_asgi(self, app, span_details=None):
        """`app` with one OpenTelemetry server span per HTTP request (the parent of the gRPC calls it makes), or
        `app` itself when tracing is off. `span_details(scope) -> (name, attributes)` names the spans. Paths in
        UNTRACED_HTTP get none, decided on the request path alone (never on the client's Host header), nor do
        the per-message receive/send steps. The middleware's own HTTP metrics are off: they are not named
        instgenie_* and would be labelled with the client's Host header."""
        if not self.tracing:
            return app
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
        from opentelemetry.metrics import NoOpMeterProvider

        traced = OpenTelemetryMiddleware(app, default_span_details=span_details, exclude_spans=["receive", "send"],
                                         meter_provider=NoOpMeterProvider())

        async def route(scope, receive, send):
            untraced = scope["type"] != "http" or _untraced_path(scope.get("path", ""))
            await (app if untraced else traced)(scope, receive, send)

        return route

    def ready_info(self) -> dict:
        """What the process's ready file says about telemetry."""
        return {"metrics": self.metrics_address} if self.metrics_address else {}

    def shutdown(self) -> None:
        for close in reversed(self._closers):
            try:
                close()
            except Exception:  # noqa: BLE001 - telemetry must never keep a process from stopping
                log.debug("telemetry shutdown step failed", exc_info=True)
        self._closers.clear()


def _traced_filter():
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(filters.any_of(*[filters.service_name(s) for s in UNTRACED_SERVICES],
                                         *[filters.method_name(m) for m in UNTRACED_METHODS]))


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return (host.strip("[]") or "0.0.0.0"), int(port)


def setup_telemetry(service: str, args: argparse.Namespace, *, instance: str = "") -> Telemetry:
    """Install metrics (when --metrics-listen) and tracing (when --otlp-endpoint) for this process."""
    from opentelemetry.sdk.resources import Resource

    tel = Telemetry(service)
    attributes = {"service.name": f"instgenie-{service}", "service.namespace": "instgenie"}
    if instance:
        attributes["service.instance.id"] = instance
    resource = Resource.create(attributes)
    listen = getattr(args, "metrics_listen", "")
    if listen:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from prometheus_client import start_http_server

        reader = PrometheusMetricReader(scope_info_enabled=False)
        provider = MeterProvider(metric_readers=[reader], resource=resource, views=_views())
        metrics.set_meter_provider(provider)
        host, port = _split(listen)
        server, thread = start_http_server(port, addr=host)
        shown = f"[{host}]" if ":" in host else host
        tel.metrics_address = f"{shown}:{server.server_port}"
        tel._closers.append(provider.shutdown)
        tel._closers.append(server.shutdown)
        log.info("metrics served on http://%s/metrics", tel.metrics_address)
    endpoint = getattr(args, "otlp_endpoint", "")
    if endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=resource)
        insecure = not endpoint.startswith("https://")
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=insecure)))
        trace.set_tracer_provider(provider)
        # Every grpc.aio channel opened from now on carries the context (the calls between services).
        client = GrpcAioInstrumentorClient(filter_=_traced_filter())
        client.instrument(tracer_provider=provider)
        tel.tracing = True
        tel._closers.append(provider.shutdown)  # flushes what is queued
        tel._closers.append(client.uninstrument)
        log.info("traces sent to %s (OTLP/gRPC)", endpoint)
    return tel


# ------------------------------------------------------------------------------------------------ traces
def current_span():
    """The active span when it records (tracing on and sampled), else None: callers skip the work."""
    span = trace.get_current_span()
    return span if span.is_recording() else None


def span_event(name: str, **attributes) -> None:
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(name, attributes)


async def end_stream(call) -> None:
    """Cancel a server-streaming call whose reading stopped (the answer came), and end its client span now.

    The gRPC OpenTelemetry interceptor ends a streaming call's span when its response iterator is closed, which
    nothing does before garbage collection when the caller stops at the result; closed here, the span ends
    with the call. Without tracing (no interceptor) this is `call.cancel()`.
    """
    call.cancel()
    task = getattr(call, "_interceptors_task", None)  # grpc.aio's intercepted call
    if task is None or not task.done() or task.cancelled() or task.exception() is not None:
        return
    responses = getattr(task.result(), "_response_iterator", None)  # the interceptor's generator
    if responses is not None and hasattr(responses, "aclose"):
        try:
            await responses.aclose()
        except Exception:  # noqa: BLE001 - ending a span must never fail a call
            log.debug("closing a traced stream failed", exc_info=True)
