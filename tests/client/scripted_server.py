"""Scripted test servers for client-side behaviour: real gRPC servers on 127.0.0.1:0 that answer from a script.

Not the InstGenIE gateway: each RPC pops its next scripted answer (a response, a `Fail`, a `Stream`, or a
callable) and every call is recorded with its request, metadata and remaining deadline, so SDK and CLI tests
can check what the client sent (bearer key, request ids, deadlines) and how it reacts (retries, typed errors).
"""
from __future__ import annotations

import io
import threading
from collections import defaultdict, deque
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import grpc
from google.longrunning import operations_pb2
from google.protobuf import timestamp_pb2
from PIL import Image

from instgenie.gateway.v1 import edit_service_pb2 as pb
from instgenie.gateway.v1 import edit_service_pb2_grpc as pb_grpc
from instgenie.scheduler.v1 import scheduler_service_pb2 as spb
from instgenie.scheduler.v1 import scheduler_service_pb2_grpc as spb_grpc
from instgenie.status import StatusInfo


@dataclass
class Fail:
    """Answer with an error; `info` travels as google.rpc details in the trailer."""

    code: grpc.StatusCode
    message: str = "scripted failure"
    info: StatusInfo | None = None
    # abort_with_status(info.to_grpc_status()) instead of set_trailing_metadata(...) + abort(code, message)
    via_status: bool = False


@dataclass
class Stream:
    """Answer a server-streaming call with these messages, then optionally fail or wait."""

    messages: list = field(default_factory=list)
    then: Fail | None = None
    hold: threading.Event | None = None  # after the messages, wait until set or the client cancels


@dataclass
class Seen:
    method: str
    request: object
    metadata: dict[str, str]
    time_remaining: float | None  # None when the client set no deadline


class _Recorder:
    def __init__(self, api_key: str | None = None):
        self.api_key = api_key
        self.seen: list[Seen] = []
        self.cancelled: dict[str, threading.Event] = defaultdict(threading.Event)
        self._answers: dict[str, deque] = defaultdict(deque)
        self._lock = threading.Lock()

    def script(self, method: str, *answers) -> None:
        with self._lock:
            self._answers[method].extend(answers)

    def calls(self, method: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.method == method]

    def left(self, method: str) -> int:
        with self._lock:
            return len(self._answers[method])

    def _next(self, method: str, request, context):
        with self._lock:
            self.seen.append(Seen(method, request, dict(context.invocation_metadata()), context.time_remaining()))
            answer = self._answers[method].popleft() if self._answers[method] else None
        if self.api_key is not None and \
                dict(context.invocation_metadata()).get("authorization") != f"Bearer {self.api_key}":
            _fail(context, Fail(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key",
                                StatusInfo(grpc.StatusCode.UNAUTHENTICATED, "", reason="API_KEY_INVALID")))
        if answer is None:
            _fail(context, Fail(grpc.StatusCode.INTERNAL, f"scripted server: no answer left for {method}"))
        if callable(answer) and not isinstance(answer, type):
            answer = answer(request, context)
        return answer

    def _unary(self, method: str, request, context):
        answer = self._next(method, request, context)
        if isinstance(answer, Fail):
            _fail(context, answer)
        return answer

    def _stream(self, method: str, request, context) -> Iterator:
        answer = self._next(method, request, context)
        if isinstance(answer, Fail):
            _fail(context, answer)
        try:
            for message in answer.messages:
                yield message
        except GeneratorExit:  # gRPC dropped the stream between messages: the client cancelled it
            self.cancelled[method].set()
            raise
        if answer.hold is not None:
            while context.is_active() and not answer.hold.wait(0.01):
                pass
            if not context.is_active():
                self.cancelled[method].set()
                return
        if answer.then is not None:
            _fail(context, answer.then)


def _fail(context, failure: Fail):
    if failure.info is not None and failure.via_status:
        context.abort_with_status(failure.info.to_grpc_status())
    if failure.info is not None:
        context.set_trailing_metadata(failure.info.trailing_metadata())
    context.abort(failure.code, failure.message)


class ScriptedEditService(_Recorder, pb_grpc.EditServiceServicer):
    """EditService answering from per-method scripts; with `api_key`, calls without its bearer are rejected."""

    def CreateTemplate(self, request, context):
        return self._unary("CreateTemplate", request, context)

    def GetOperation(self, request, context):
        return self._unary("GetOperation", request, context)

    def WaitOperation(self, request, context):
        return self._unary("WaitOperation", request, context)

    def WatchOperation(self, request, context):
        return self._stream("WatchOperation", request, context)

    def GetTemplate(self, request, context):
        return self._unary("GetTemplate", request, context)

    def ListTemplates(self, request, context):
        return self._unary("ListTemplates", request, context)

    def DeleteTemplate(self, request, context):
        return self._unary("DeleteTemplate", request, context)

    def Edit(self, request, context):
        return self._unary("Edit", request, context)

    def StreamEdit(self, request, context):
        return self._stream("StreamEdit", request, context)

    def CancelEdit(self, request, context):
        return self._unary("CancelEdit", request, context)

    def ListModels(self, request, context):
        return self._unary("ListModels", request, context)


class ScriptedSchedulerService(_Recorder, spb_grpc.SchedulerServiceServicer):
    """Only GetClusterStatus, the one scheduler call the CLI makes."""

    def GetClusterStatus(self, request, context):
        return self._unary("GetClusterStatus", request, context)


@contextmanager
def serving(edit: ScriptedEditService | None = None,
            scheduler: ScriptedSchedulerService | None = None) -> Iterator[str]:
    """Runs the servicers on an ephemeral loopback port; yields "127.0.0.1:<port>" and stops the server after."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    if edit is not None:
        pb_grpc.add_EditServiceServicer_to_server(edit, server)
    if scheduler is not None:
        spb_grpc.add_SchedulerServiceServicer_to_server(scheduler, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait()


def at_most(seconds: float) -> float:
    """The most a server may see left of a `seconds` deadline: gRPC rounds the grpc-timeout header up a little."""
    return seconds * 1.01 + 0.2


# -- messages the scripts answer with ---------------------------------------------------------------------------

def png(width: int = 16, height: int = 16, color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


def template(template_id: str = "tpl-1", state: int = pb.TEMPLATE_STATE_READY, **fields) -> pb.Template:
    created = timestamp_pb2.Timestamp(seconds=1_767_225_600)  # 2026-01-01T00:00:00Z
    values = dict(template_id=template_id, name="shoe", state=state, model="digits", width=16, height=16,
                  steps=4, prompt="3", cache_mode=pb.CACHE_MODE_KV, create_time=created, update_time=created,
                  cache_bytes=123_456, operation=f"operations/{template_id}")
    values.update(fields)
    return pb.Template(**values)


def operation(template_id: str = "tpl-1", *, steps_done: int = 0, total_steps: int = 4, done: bool = False,
              state: int = pb.TEMPLATE_STATE_CREATING, response: pb.Template | None = None,
              error: StatusInfo | None = None) -> operations_pb2.Operation:
    op = operations_pb2.Operation(name=f"operations/{template_id}", done=done)
    op.metadata.Pack(pb.CreateTemplateMetadata(template_id=template_id, state=state, steps_done=steps_done,
                                               total_steps=total_steps))
    if response is not None:
        op.response.Pack(response)
    if error is not None:
        op.error.CopyFrom(error.to_proto())
    return op


def edit_result(request_id: str = "r-1", **fields) -> pb.EditResult:
    values = dict(request_id=request_id, template_id="tpl-1", mime_type="image/png", image=png(color=(0, 0, 255)),
                  seed=42, steps=4, mask_ratio=0.125, queue_seconds=0.25, total_seconds=1.5, worker="worker-0")
    values.update(fields)
    return pb.EditResult(**values)


def edit_events(request_id: str = "r-1", steps: int = 4, **result_fields) -> list[pb.StreamEditResponse]:
    """A complete StreamEdit answer: accepted, queued, started, one progress per step, keepalive, result."""
    E = pb.StreamEditResponse
    events = [E(request_id=request_id, accepted=E.Accepted(predicted_seconds=2.5)),
              E(request_id=request_id, queued=E.Queued(position=1)),
              E(request_id=request_id, keepalive=E.Keepalive()),
              E(request_id=request_id, started=E.Started(worker="worker-0", batch_size=2, cache_tier="host"))]
    events += [E(request_id=request_id, progress=E.Progress(step=s, total_steps=steps, batch_size=2))
               for s in range(1, steps + 1)]
    events.append(E(request_id=request_id, result=edit_result(request_id, **result_fields)))
    return events


def echo_request_id(make: Callable[[str], object]) -> Callable:
    """An answer built from the request's id (Edit/StreamEdit), for scripts that must echo it."""
    def answer(request, context):
        edit = request.edit if hasattr(request, "edit") else request
        return make(edit.request_id)
    return answer


def invalid_argument(field_name: str = "mask", description: str = "the mask is empty") -> Fail:
    from instgenie.status import FieldViolation
    info = StatusInfo(grpc.StatusCode.INVALID_ARGUMENT, "", reason="MASK_EMPTY",
                      violations=[FieldViolation(field_name, description)])
    return Fail(grpc.StatusCode.INVALID_ARGUMENT, "bad mask", info)


def unavailable(message: str = "gateway restarting") -> Fail:
    return Fail(grpc.StatusCode.UNAVAILABLE, message)


def cluster_status() -> spb.GetClusterStatusResponse:
    from instgenie.worker.v1 import worker_service_pb2 as wpb
    worker = spb.WorkerInfo(worker_id="worker-0", address="127.0.0.1:6001", max_batch_size=8, device="cpu",
                            model=wpb.ModelInfo(model_id="digits", width=16, height=16))
    load = wpb.WorkerLoad(running=[wpb.RequestLoad(request_id="r-1"), wpb.RequestLoad(request_id="r-2")],
                          waiting=[wpb.RequestLoad(request_id="r-3")], preparing=1,
                          resident_templates=["tpl-1", "tpl-2", "tpl-3"])
    drained = spb.WorkerInfo(worker_id="worker-1", address="127.0.0.1:6002",
                             model=wpb.ModelInfo(model_id="digits"))
    return spb.GetClusterStatusResponse(
        workers=[spb.WorkerStatus(worker=worker, load=load, report_age_seconds=0.4, in_flight=3),
                 spb.WorkerStatus(worker=drained, load=wpb.WorkerLoad(draining=True), report_age_seconds=1.6)],
        in_flight=3, max_in_flight=64, placement_policy="cost", edits_placed=120, edits_replaced=2,
        edits_rejected=5)
