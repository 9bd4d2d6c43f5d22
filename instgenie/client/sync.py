"""The synchronous InstGenIE client: every EditService call with Pythonic types, deadlines and safe retries."""
from __future__ import annotations

import random
import time
from contextlib import closing
from typing import Callable, Iterator, Sequence

import grpc

from instgenie.gateway.v1 import edit_service_pb2 as pb
from instgenie.gateway.v1 import edit_service_pb2_grpc as pb_grpc

from . import calls
from .errors import DeadlineExceeded, InstGenIEError, NotFound, Unknown, error_from_rpc
from .inputs import ImageInput
from .retry import Deadline, RetryPolicy
from .types import (CancelOutcome, EditEvent, EditResult, Model, Operation, Result, Template, TemplatePage,
                    event_from_proto, operation_name, enum_from_proto)

_sleep = time.sleep  # module-level so tests can watch the backoff without waiting it out

ProgressCallback = Callable[[Operation], None]


def call_unary(method, request, *, metadata, deadline: Deadline, policy: RetryPolicy, idempotent: bool,
               rng: random.Random):
    """One unary call with retries inside `deadline`; failures come out as typed InstGenIEErrors."""
    earlier: list[InstGenIEError] = []
    while True:
        try:
            return method(request, timeout=deadline.remaining(), metadata=metadata)
        except grpc.RpcError as rpc_error:
            err = error_from_rpc(rpc_error)
            wait = policy.delay(err, len(earlier), idempotent, rng)
            if wait is None or wait >= deadline.remaining():
                err.earlier = tuple(earlier)
                raise err from rpc_error
            earlier.append(err)
        _sleep(wait)


def call_stream(method, request, *, metadata, deadline: Deadline, policy: RetryPolicy, idempotent: bool,
                rng: random.Random) -> Iterator:
    """A server stream, re-opened with the same request after a retryable failure (the server replays or resumes).

    Closing the iterator early cancels the call, which is how a caller abandons an edit.
    """
    earlier: list[InstGenIEError] = []
    while True:
        call = method(request, timeout=deadline.remaining(), metadata=metadata)
        try:
            for message in call:
                yield message
            return
        except grpc.RpcError as rpc_error:
            err = error_from_rpc(rpc_error)
            wait = policy.delay(err, len(earlier), idempotent, rng)
            if wait is None or wait >= deadline.remaining():
                err.earlier = tuple(earlier)
                raise err from rpc_error
            earlier.append(err)
        finally:
            call.cancel()
        _sleep(wait)


class Client:
    """A connection to an InstGenIE gateway. Thread-safe; close it (or use `with`) when done.

    Every call sets a deadline (`timeout`: 30 s, `edit_timeout`: 300 s, `create_timeout`: 1800 s for
    create_template(wait=True) and operation waits; each method's `timeout=` overrides). UNAVAILABLE is retried
    with backoff up to `max_retries` times, only for calls that cannot run twice: reads, edits (the SDK always
    sends a request id), template creation with a `request_id`, cancel and delete.
    """

    def __init__(self, address: str = calls.DEFAULT_ADDRESS, api_key: str | None = None, *,
                 timeout: float = 30.0, edit_timeout: float = 300.0, create_timeout: float = 1800.0,
                 max_retries: int = 4, initial_backoff: float = 0.25, max_backoff: float = 8.0,
                 retry_resource_exhausted: bool = False, tls: bool = False,
                 root_certificates: bytes | None = None, channel_options: Sequence[tuple[str, object]] = ()):
        self.address = address
        self.timeouts = calls.Timeouts(default=timeout, edit=edit_timeout, create_wait=create_timeout)
        self.retry = RetryPolicy(max_retries=max_retries, initial_backoff=initial_backoff, max_backoff=max_backoff,
                                 retry_resource_exhausted=retry_resource_exhausted)
        options = calls.channel_options(channel_options)
        if tls:
            self._channel = grpc.secure_channel(address, calls.channel_credentials(root_certificates), options)
        else:
            self._channel = grpc.insecure_channel(address, options)
        self._stub = pb_grpc.EditServiceStub(self._channel)
        self._metadata = calls.auth_metadata(api_key)
        self._rng = random.Random()

    # -- plumbing -------------------------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _deadline(self, timeout: float | None, default: float) -> Deadline:
        return Deadline(default if timeout is None else timeout)

    def _unary(self, name: str, request, deadline: Deadline, *, idempotent: bool = True):
        return call_unary(getattr(self._stub, name), request, metadata=self._metadata, deadline=deadline,
                          policy=self.retry, idempotent=idempotent, rng=self._rng)

    def _stream(self, name: str, request, deadline: Deadline, *, idempotent: bool = True) -> Iterator:
        return call_stream(getattr(self._stub, name), request, metadata=self._metadata, deadline=deadline,
                           policy=self.retry, idempotent=idempotent, rng=self._rng)

    # -- templates ------------------------------------------------------------------------------------------

    def create_template(self, image: ImageInput, prompt: str = "", *, name: str = "", steps: int = 0,
                        seed: int = 0, guidance_scale: float | None = None, cache_mode: str | None = None,
                        model: str = "", request_id: str | None = None, wait: bool = True,
                        progress: ProgressCallback | None = None,
                        timeout: float | None = None) -> Template | Operation:
        """Registers a template. With `wait` returns the ready Template (raising the operation's error if
        creation failed), calling `progress(operation)` on every change; without, returns the Operation at once.
        Pass `request_id` to make the call safe to retry (and retried on UNAVAILABLE)."""
        request = calls.create_template_request(image, prompt, name=name, steps=steps, seed=seed,
                                                guidance_scale=guidance_scale, cache_mode=cache_mode, model=model,
                                                request_id=request_id)
        idempotent = bool(request.request_id)
        if not wait:
            response = self._unary("CreateTemplate", request, self._deadline(timeout, self.timeouts.default),
                                   idempotent=idempotent)
            return Operation.from_proto(response.operation)
        deadline = self._deadline(timeout, self.timeouts.create_wait)
        response = self._unary("CreateTemplate", request, deadline.capped(self.timeouts.default),
                               idempotent=idempotent)
        operation = Operation.from_proto(response.operation)
        if progress is not None:
            progress(operation)
        operation = self._until_done(operation, deadline, progress)
        if operation.error is not None:
            raise operation.error
        if operation.template is not None:
            return operation.template
        return self.get_template(operation.template_id, timeout=max(1.0, deadline.remaining()))

    def _until_done(self, operation: Operation, deadline: Deadline, progress: ProgressCallback | None) -> Operation:
        try:
            if not operation.done:
                with closing(self._watch(operation.name, deadline)) as updates:
                    for operation in updates:
                        if progress is not None:
                            progress(operation)
            while not operation.done:
                # The watch ended before the operation did (say a gateway restart): block on WaitOperation.
                remaining = deadline.remaining()
                if remaining <= 0:
                    raise DeadlineExceeded("deadline passed")
                grace = calls.wait_grace(remaining)
                response = self._unary("WaitOperation",
                                       calls.wait_operation_request(operation.name, remaining - grace), deadline)
                operation = Operation.from_proto(response.operation)
                if progress is not None:
                    progress(operation)
                if not operation.done:
                    _sleep(min(self.retry.initial_backoff, deadline.remaining()))
        except DeadlineExceeded as err:
            raise DeadlineExceeded(f"template {operation.template_id} was not ready within {deadline.seconds:g} s; "
                                   f"it is still being created: wait_operation({operation.name!r})",
                                   reason=err.reason) from err
        return operation

    def _watch(self, name: str, deadline: Deadline) -> Iterator[Operation]:
        request = pb.WatchOperationRequest(name=operation_name(name))
        for response in self._stream("WatchOperation", request, deadline):
            operation = Operation.from_proto(response.operation)
            yield operation
            if operation.done:
                return

    def get_operation(self, name: str, *, timeout: float | None = None) -> Operation:
        """An operation by name ("operations/<template id>", or the bare template id)."""
        response = self._unary("GetOperation", pb.GetOperationRequest(name=operation_name(name)),
                               self._deadline(timeout, self.timeouts.default))
        return Operation.from_proto(response.operation)

    def wait_operation(self, name: str, timeout: float | None = None) -> Operation:
        """The operation once done, or its state when `timeout` (default `create_timeout`) passes first."""
        seconds = self.timeouts.create_wait if timeout is None else timeout
        response = self._unary("WaitOperation", calls.wait_operation_request(name, seconds),
                               Deadline(seconds + calls.wait_grace(seconds)))
        return Operation.from_proto(response.operation)

    def watch_operation(self, name: str, *, timeout: float | None = None) -> Iterator[Operation]:
        """The operation's state on every change, ending with the done state."""
        return self._watch(name, self._deadline(timeout, self.timeouts.create_wait))

    def get_template(self, template_id: str, *, timeout: float | None = None) -> Template:
        response = self._unary("GetTemplate", pb.GetTemplateRequest(template_id=template_id),
                               self._deadline(timeout, self.timeouts.default))
        return Template.from_proto(response.template)

    def list_templates(self, page_size: int = 0, page_token: str = "", *,
                       timeout: float | None = None) -> TemplatePage:
        """One page of the tenant's templates, newest first (page_size 0: the server's default, 50)."""
        response = self._unary("ListTemplates", pb.ListTemplatesRequest(page_size=page_size, page_token=page_token),
                               self._deadline(timeout, self.timeouts.default))
        return TemplatePage([Template.from_proto(t) for t in response.templates], response.next_page_token)

    def iter_templates(self, page_size: int = 0, *, timeout: float | None = None) -> Iterator[Template]:
        """Every template of the tenant, fetching pages as needed (each page its own deadline)."""
        token = ""
        while True:
            page = self.list_templates(page_size, token, timeout=timeout)
            yield from page.templates
            token = page.next_page_token
            if not token:
                return

    def delete_template(self, template_id: str, *, timeout: float | None = None) -> None:
        """Deletes a template and its cache. Deleting one that is still being created is FailedPrecondition."""
        try:
            self._unary("DeleteTemplate", pb.DeleteTemplateRequest(template_id=template_id),
                        self._deadline(timeout, self.timeouts.default))
        except NotFound as err:
            # An attempt that failed with UNAVAILABLE may have deleted it before the connection broke; the
            # template is gone either way, which is what the caller asked for.
            if any(e.code == grpc.StatusCode.UNAVAILABLE for e in err.earlier):
                return
            raise

    # -- edits ----------------------------------------------------------------------------------------------

    def edit(self, template_id: str, mask: ImageInput, prompt: str, *, seed: int | None = None, steps: int = 0,
             guidance_scale: float | None = None, dilate: int = 0, request_id: str | None = None,
             timeout: float | None = None) -> EditResult:
        """Edits the masked (white) region of a template; retried safely under one request id."""
        request = calls.edit_request(template_id, mask, prompt, seed=seed, steps=steps,
                                     guidance_scale=guidance_scale, dilate=dilate, request_id=request_id)
        response = self._unary("Edit", request, self._deadline(timeout, self.timeouts.edit))
        return EditResult.from_proto(response.result)

    def stream_edit(self, template_id: str, mask: ImageInput, prompt: str, *, seed: int | None = None,
                    steps: int = 0, guidance_scale: float | None = None, dilate: int = 0,
                    request_id: str | None = None, timeout: float | None = None) -> Iterator[EditEvent]:
        """The edit as events (Accepted, Queued, Started, Progress, Keepalive), ending with a Result.

        After a dropped connection the stream re-attaches under the same request id, so events may repeat.
        Closing the iterator early cancels the call and frees the edit's batch slot.
        """
        request = pb.StreamEditRequest(edit=calls.edit_request(
            template_id, mask, prompt, seed=seed, steps=steps, guidance_scale=guidance_scale, dilate=dilate,
            request_id=request_id))
        return self._edit_events(request, self._deadline(timeout, self.timeouts.edit))

    def _edit_events(self, request: pb.StreamEditRequest, deadline: Deadline) -> Iterator[EditEvent]:
        with closing(self._stream("StreamEdit", request, deadline)) as messages:
            for message in messages:
                event = event_from_proto(message)
                if event is None:
                    continue
                yield event
                if isinstance(event, Result):
                    return
        raise Unknown(f"the stream of edit {request.edit.request_id} ended without a result")

    def cancel_edit(self, request_id: str, *, timeout: float | None = None) -> CancelOutcome:
        """Stops a running edit at its next step: "cancelled", or "already_finished" when it was past the loop."""
        response = self._unary("CancelEdit", pb.CancelEditRequest(request_id=request_id),
                               self._deadline(timeout, self.timeouts.default))
        return enum_from_proto(CancelOutcome, pb.CancelOutcome, "CANCEL_OUTCOME_", response.outcome)

    def list_models(self, *, timeout: float | None = None) -> list[Model]:
        response = self._unary("ListModels", pb.ListModelsRequest(), self._deadline(timeout, self.timeouts.default))
        return [Model.from_proto(m) for m in response.models]
