"""The asyncio InstGenIE client: the same calls as `Client`, as coroutines and async iterators over grpc.aio."""
from __future__ import annotations

import asyncio
import random
from typing import AsyncIterator, Callable, Sequence

import grpc
import grpc.aio

from instgenie.gateway.v1 import edit_service_pb2 as pb
from instgenie.gateway.v1 import edit_service_pb2_grpc as pb_grpc

from . import calls
from .errors import DeadlineExceeded, InstGenIEError, NotFound, Unknown, error_from_rpc
from .inputs import ImageInput
from .retry import Deadline, RetryPolicy
from .types import (CancelOutcome, EditEvent, EditResult, Model, Operation, Result, Template, TemplatePage,
                    enum_from_proto, event_from_proto, operation_name)

_sleep = asyncio.sleep  # module-level so tests can watch the backoff without waiting it out

ProgressCallback = Callable[[Operation], None]


async def call_unary(method, request, *, metadata, deadline: Deadline, policy: RetryPolicy, idempotent: bool,
                     rng: random.Random):
    """One unary call with retries inside `deadline`; failures come out as typed InstGenIEErrors."""
    earlier: list[InstGenIEError] = []
    while True:
        try:
            return await method(request, timeout=deadline.remaining(), metadata=metadata)
        except grpc.RpcError as rpc_error:
            err = error_from_rpc(rpc_error)
            wait = policy.delay(err, len(earlier), idempotent, rng)
            if wait is None or wait >= deadline.remaining():
                err.earlier = tuple(earlier)
                raise err from rpc_error
            earlier.append(err)
        await _sleep(wait)


async def call_stream(method, request, *, metadata, deadline: Deadline, policy: RetryPolicy, idempotent: bool,
                      rng: random.Random) -> AsyncIterator:
    """A server stream, re-opened with the same request after a retryable failure; closing it cancels the call."""
    earlier: list[InstGenIEError] = []
    while True:
        call = method(request, timeout=deadline.remaining(), metadata=metadata)
        try:
            async for message in call:
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
        await _sleep(wait)


class AsyncClient:
    """`Client` for asyncio: same arguments, defaults and retry rules; use `async with` or `await close()`.

    Use one client within one event loop (its channel opens on the first call, in that loop).

    Streaming methods (watch_operation, iter_templates, stream_edit) return async iterators; wrap them in
    `contextlib.aclosing` when you may leave the loop early, so the call is cancelled at once.
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
        self._options = calls.channel_options(channel_options)
        self._credentials = calls.channel_credentials(root_certificates) if tls else None
        # Opened on first use: a grpc.aio channel belongs to the event loop running when it is made, so the
        # client can be built anywhere (module level, sync setup code) and then used inside one loop.
        self._channel: grpc.aio.Channel | None = None
        self._stub_: pb_grpc.EditServiceStub | None = None
        self._metadata = calls.auth_metadata(api_key)
        self._rng = random.Random()

    # -- plumbing -------------------------------------------------------------------------------------------

    @property
    def _stub(self) -> pb_grpc.EditServiceStub:
        if self._stub_ is None:
            if self._credentials is not None:
                self._channel = grpc.aio.secure_channel(self.address, self._credentials, self._options)
            else:
                self._channel = grpc.aio.insecure_channel(self.address, self._options)
            self._stub_ = pb_grpc.EditServiceStub(self._channel)
        return self._stub_

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub_ = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _deadline(self, timeout: float | None, default: float) -> Deadline:
        return Deadline(default if timeout is None else timeout)

    async def _unary(self, name: str, request, deadline: Deadline, *, idempotent: bool = True):
        return await call_unary(getattr(self._stub, name), request, metadata=self._metadata, deadline=deadline,
                                policy=self.retry, idempotent=idempotent, rng=self._rng)

    def _stream(self, name: str, request, deadline: Deadline, *, idempotent: bool = True) -> AsyncIterator:
        return call_stream(getattr(self._stub, name), request, metadata=self._metadata, deadline=deadline,
                           policy=self.retry, idempotent=idempotent, rng=self._rng)

    # -- templates ------------------------------------------------------------------------------------------

    async def create_template(self, image: ImageInput, prompt: str = "", *, name: str = "", steps: int = 0,
                              seed: int = 0, guidance_scale: float | None = None, cache_mode: str | None = None,
                              model: str = "", request_id: str | None = None, wait: bool = True,
                              progress: ProgressCallback | None = None,
                              timeout: float | None = None) -> Template | Operation:
        """See `Client.create_template`."""
        request = calls.create_template_request(image, prompt, name=name, steps=steps, seed=seed,
                                                guidance_scale=guidance_scale, cache_mode=cache_mode, model=model,
                                                request_id=request_id)
        idempotent = bool(request.request_id)
        if not wait:
            response = await self._unary("CreateTemplate", request, self._deadline(timeout, self.timeouts.default),
                                         idempotent=idempotent)
            return Operation.from_proto(response.operation)
        deadline = self._deadline(timeout, self.timeouts.create_wait)
        response = await self._unary("CreateTemplate", request, deadline.capped(self.timeouts.default),
                                     idempotent=idempotent)
        operation = Operation.from_proto(response.operation)
        if progress is not None:
            progress(operation)
        operation = await self._until_done(operation, deadline, progress)
        if operation.error is not None:
            raise operation.error
        if operation.template is not None:
            return operation.template
        return await self.get_template(operation.template_id, timeout=max(1.0, deadline.remaining()))

    async def _until_done(self, operation: Operation, deadline: Deadline,
                          progress: ProgressCallback | None) -> Operation:
        try:
            if not operation.done:
                updates = self._watch(operation.name, deadline)
                try:
                    async for operation in updates:
                        if progress is not None:
                            progress(operation)
                finally:
                    await updates.aclose()
            while not operation.done:
                # The watch ended before the operation did (say a gateway restart): block on WaitOperation.
                remaining = deadline.remaining()
                if remaining <= 0:
                    raise DeadlineExceeded("deadline passed")
                grace = calls.wait_grace(remaining)
                response = await self._unary("WaitOperation",
                                             calls.wait_operation_request(operation.name, remaining - grace),
                                             deadline)
                operation = Operation.from_proto(response.operation)
                if progress is not None:
                    progress(operation)
                if not operation.done:
                    await _sleep(min(self.retry.initial_backoff, deadline.remaining()))
        except DeadlineExceeded as err:
            raise DeadlineExceeded(f"template {operation.template_id} was not ready within {deadline.seconds:g} s; "
                                   f"it is still being created: wait_operation({operation.name!r})",
                                   reason=err.reason) from err
        return operation

    async def _watch(self, name: str, deadline: Deadline) -> AsyncIterator[Operation]:
        messages = self._stream("WatchOperation", pb.WatchOperationRequest(name=operation_name(name)), deadline)
        try:
            async for response in messages:
                operation = Operation.from_proto(response.operation)
                yield operation
                if operation.done:
                    return
        finally:
            await messages.aclose()

    async def get_operation(self, name: str, *, timeout: float | None = None) -> Operation:
        response = await self._unary("GetOperation", pb.GetOperationRequest(name=operation_name(name)),
                                     self._deadline(timeout, self.timeouts.default))
        return Operation.from_proto(response.operation)

    async def wait_operation(self, name: str, timeout: float | None = None) -> Operation:
        seconds = self.timeouts.create_wait if timeout is None else timeout
        response = await self._unary("WaitOperation", calls.wait_operation_request(name, seconds),
                                     Deadline(seconds + calls.wait_grace(seconds)))
        return Operation.from_proto(response.operation)

    def watch_operation(self, name: str, *, timeout: float | None = None) -> AsyncIterator[Operation]:
        return self._watch(name, self._deadline(timeout, self.timeouts.create_wait))

    async def get_template(self, template_id: str, *, timeout: float | None = None) -> Template:
        response = await self._unary("GetTemplate", pb.GetTemplateRequest(template_id=template_id),
                                     self._deadline(timeout, self.timeouts.default))
        return Template.from_proto(response.template)

    async def list_templates(self, page_size: int = 0, page_token: str = "", *,
                             timeout: float | None = None) -> TemplatePage:
        response = await self._unary("ListTemplates",
                                     pb.ListTemplatesRequest(page_size=page_size, page_token=page_token),
                                     self._deadline(timeout, self.timeouts.default))
        return TemplatePage([Template.from_proto(t) for t in response.templates], response.next_page_token)

    async def iter_templates(self, page_size: int = 0, *, timeout: float | None = None) -> AsyncIterator[Template]:
        token = ""
        while True:
            page = await self.list_templates(page_size, token, timeout=timeout)
            for template in page.templates:
                yield template
            token = page.next_page_token
            if not token:
                return

    async def delete_template(self, template_id: str, *, timeout: float | None = None) -> None:
        try:
            await self._unary("DeleteTemplate", pb.DeleteTemplateRequest(template_id=template_id),
                              self._deadline(timeout, self.timeouts.default))
        except NotFound as err:
            # As in Client: a retry's NOT_FOUND after an UNAVAILABLE attempt means an earlier attempt deleted it.
            if any(e.code == grpc.StatusCode.UNAVAILABLE for e in err.earlier):
                return
            raise

    # -- edits ----------------------------------------------------------------------------------------------

    async def edit(self, template_id: str, mask: ImageInput, prompt: str, *, seed: int | None = None,
                   steps: int = 0, guidance_scale: float | None = None, dilate: int = 0,
                   request_id: str | None = None, timeout: float | None = None) -> EditResult:
        request = calls.edit_request(template_id, mask, prompt, seed=seed, steps=steps,
                                     guidance_scale=guidance_scale, dilate=dilate, request_id=request_id)
        response = await self._unary("Edit", request, self._deadline(timeout, self.timeouts.edit))
        return EditResult.from_proto(response.result)

    def stream_edit(self, template_id: str, mask: ImageInput, prompt: str, *, seed: int | None = None,
                    steps: int = 0, guidance_scale: float | None = None, dilate: int = 0,
                    request_id: str | None = None, timeout: float | None = None) -> AsyncIterator[EditEvent]:
        """See `Client.stream_edit`; the inputs are checked here, before the first `async for` step."""
        request = pb.StreamEditRequest(edit=calls.edit_request(
            template_id, mask, prompt, seed=seed, steps=steps, guidance_scale=guidance_scale, dilate=dilate,
            request_id=request_id))
        return self._edit_events(request, self._deadline(timeout, self.timeouts.edit))

    async def _edit_events(self, request: pb.StreamEditRequest, deadline: Deadline) -> AsyncIterator[EditEvent]:
        messages = self._stream("StreamEdit", request, deadline)
        try:
            async for message in messages:
                event = event_from_proto(message)
                if event is None:
                    continue
                yield event
                if isinstance(event, Result):
                    return
        finally:
            await messages.aclose()
        raise Unknown(f"the stream of edit {request.edit.request_id} ended without a result")

    async def cancel_edit(self, request_id: str, *, timeout: float | None = None) -> CancelOutcome:
        response = await self._unary("CancelEdit", pb.CancelEditRequest(request_id=request_id),
                                     self._deadline(timeout, self.timeouts.default))
        return enum_from_proto(CancelOutcome, pb.CancelOutcome, "CANCEL_OUTCOME_", response.outcome)

    async def list_models(self, *, timeout: float | None = None) -> list[Model]:
        response = await self._unary("ListModels", pb.ListModelsRequest(),
                                     self._deadline(timeout, self.timeouts.default))
        return [Model.from_proto(m) for m in response.models]
