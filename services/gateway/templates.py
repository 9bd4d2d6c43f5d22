"""Template metadata in the object store, scoped by tenant, so that gateways keep no state of their own.

    tenants/<tenant>/templates/<template_id>.json        the record (name, state, model, size, times, ...)
    tenants/<tenant>/create-requests/<request_id>.json   request id -> template id (idempotent creates)
    tenants/<tenant>/template-images/<template_id>        the image as uploaded (the web page shows it)
    tenants/<tenant>/template-content/<model>/<sha256>.json   content hash -> newest template of that image
    templates/<template_id>/...                           the activation cache (written by a worker)

The content index lets the OpenAI-compatible endpoint, which is sent images rather than template ids, find
the template an image already is, from any gateway replica. The hash covers the decoded pixels, their mode
and size (`content_hash`), so two encodings of one picture are one template.

Template ids sort newest first (`tpl-` + 12 hex digits of an inverted millisecond clock + 8 random hex), so
one LIST of a tenant's prefix pages through its templates in order, and a page token is just the last id.
A record lives under its tenant's prefix only: another tenant's id is simply not found.

A gateway that dies while it drives a registration leaves a CREATING record behind; whoever reads it later
settles it: READY if the worker committed the cache (its manifest exists), FAILED once it has not been
touched for `stale_after` seconds.
"""
from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import urllib.parse
from dataclasses import asdict, dataclass, field

from instgenie.gateway.v1 import edit_service_pb2 as pb

from ..common.objectstore import ObjectNotFound, ObjectStore

CREATING, READY, FAILED = "CREATING", "READY", "FAILED"
_STATES = {CREATING: pb.TEMPLATE_STATE_CREATING, READY: pb.TEMPLATE_STATE_READY, FAILED: pb.TEMPLATE_STATE_FAILED}
_MODES = {"kv": pb.CACHE_MODE_KV, "y": pb.CACHE_MODE_Y, "o": pb.CACHE_MODE_O}
_EPOCH_LIMIT_MS = 16 ** 12 - 1


TORN_READ_RETRIES = 5


class RecordCorrupt(Exception):
    """A template record that stays unreadable: the store lost data."""

    grpc_code = "DATA_LOSS"
    code = "RECORD_CORRUPT"


def content_hash(image) -> str:
    """sha256 of a decoded PIL image: mode, size and pixels (not the file's bytes)."""
    digest = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def new_template_id() -> str:
    inverted = _EPOCH_LIMIT_MS - int(time.time() * 1000)
    return f"tpl-{inverted:012x}{secrets.token_hex(4)}"


@dataclass
class TemplateRecord:
    template_id: str
    tenant: str
    name: str
    state: str
    model: str
    width: int
    height: int
    steps: int
    prompt: str
    cache_mode: str
    seed: int
    guidance_scale: float | None
    create_time: float
    update_time: float
    steps_done: int = 0
    cache_bytes: int = 0
    error: str = ""
    error_code: str = ""
    request_id: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def operation(self) -> str:
        return f"operations/{self.template_id}"

    @property
    def done(self) -> bool:
        return self.state != CREATING

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "TemplateRecord":
        fields = json.loads(data)
        known = {k: v for k, v in fields.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_proto(self) -> pb.Template:
        t = pb.Template(template_id=self.template_id, name=self.name, state=_STATES[self.state], model=self.model,
                        width=self.width, height=self.height, steps=self.steps, prompt=self.prompt,
                        cache_mode=_MODES.get(self.cache_mode, pb.CACHE_MODE_UNSPECIFIED),
                        cache_bytes=self.cache_bytes, error_message=self.error, operation=self.operation)
        t.create_time.FromNanoseconds(int(self.create_time * 1e9))
        t.update_time.FromNanoseconds(int(self.update_time * 1e9))
        return t


def encode_page_token(last_id: str) -> str:
    return base64.urlsafe_b64encode(f"v1:{last_id}".encode()).decode()


def decode_page_token(token: str) -> str | None:
    """The last id of the previous page, or None if the token is not one of ours."""
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    if not text.startswith("v1:tpl-"):
        return None
    return text[3:]


class TemplateRecords:
    """Blocking record access on the object store (the gateway calls it from a thread pool)."""

    def __init__(self, store: ObjectStore, stale_after: float = 120.0, cache_prefix: str = "templates"):
        self.store = store
        self.stale_after = stale_after
        self.cache_prefix = cache_prefix

    @staticmethod
    def _key(tenant: str, template_id: str) -> str:
        return f"tenants/{tenant}/templates/{template_id}.json"

    def put(self, record: TemplateRecord) -> None:
        record.update_time = time.time()
        self.store.put(self._key(record.tenant, record.template_id), record.to_json())

    def get(self, tenant: str, template_id: str, *, driven_here: bool = False) -> TemplateRecord | None:
        key = self._key(tenant, template_id)
        for attempt in range(TORN_READ_RETRIES + 1):
            try:
                record = TemplateRecord.from_json(self.store.get(key))
                break
            except ObjectNotFound:
                return None
            except (ValueError, TypeError) as exc:
                # Some S3 servers (the JuiceFS gateway we test with) rewrite an object in place, so a read
                # racing a progress update can see half of it. The next read sees the whole.
                if attempt == TORN_READ_RETRIES:
                    raise RecordCorrupt(f"template record {template_id!r} cannot be read: {exc}") from None
                time.sleep(0.02 * (attempt + 1))
        if record.state == CREATING and not driven_here:
            self._settle(record)
        return record

    def _settle(self, record: TemplateRecord) -> None:
        """A CREATING record nobody is driving any more: finished after all, or abandoned."""
        if time.time() - record.update_time < self.stale_after:
            return
        if self.store.exists(f"{self.cache_prefix}/{record.template_id}/manifest.json"):
            record.state, record.steps_done = READY, record.steps
        else:
            record.state, record.error_code = FAILED, "ABANDONED"
            record.error = ("registration was interrupted (its gateway stopped) before the cache was stored; "
                            "delete the template and create it again")
        self.put(record)

    def list_ids(self, tenant: str, after: str | None, limit: int) -> tuple[list[str], bool]:
        """Up to `limit` ids newest first after `after`; and whether more follow."""
        prefix = f"tenants/{tenant}/templates/"
        ids = []
        for key in self.store.list(prefix):
            tid = key[len(prefix):].removesuffix(".json")
            if after is not None and tid <= after:
                continue
            ids.append(tid)
            if len(ids) > limit:
                return ids[:limit], True
        return ids, False

    def delete(self, record: TemplateRecord) -> None:
        """Record first (the template disappears for every gateway), then the cache and the indexes."""
        self.store.delete(self._key(record.tenant, record.template_id))
        self.store.delete_prefix(f"{self.cache_prefix}/{record.template_id}/")
        if record.request_id:
            self.store.delete(self._request_key(record.tenant, record.request_id))
        self.store.delete(self._image_key(record.tenant, record.template_id))
        sha = record.extra.get("content_sha256")
        if sha and self.template_for_content(record.tenant, record.model, sha) == record.template_id:
            self.store.delete(self._content_key(record.tenant, record.model, sha))

    # ------------------------------------------------------------------- images and content index
    @staticmethod
    def _image_key(tenant: str, template_id: str) -> str:
        return f"tenants/{tenant}/template-images/{template_id}"

    @staticmethod
    def _content_key(tenant: str, model: str, sha: str) -> str:
        return f"tenants/{tenant}/template-content/{urllib.parse.quote(model, safe='')}/{sha}.json"

    def remember_content(self, record: TemplateRecord, image: bytes) -> None:
        """Keep the template's image and point its content hash at it (the newest template of an image wins)."""
        self.store.put(self._image_key(record.tenant, record.template_id), image)
        sha = record.extra.get("content_sha256")
        if sha:
            self.store.put(self._content_key(record.tenant, record.model, sha),
                           json.dumps({"template_id": record.template_id}).encode())

    def template_for_content(self, tenant: str, model: str, sha: str) -> str | None:
        try:
            return json.loads(self.store.get(self._content_key(tenant, model, sha)))["template_id"]
        except ObjectNotFound:
            return None

    def image(self, tenant: str, template_id: str) -> bytes | None:
        """The template's image as uploaded; None for templates created before images were kept."""
        try:
            return self.store.get(self._image_key(tenant, template_id))
        except ObjectNotFound:
            return None

    @staticmethod
    def _request_key(tenant: str, request_id: str) -> str:
        return f"tenants/{tenant}/create-requests/{request_id}.json"

    def template_for_request(self, tenant: str, request_id: str) -> str | None:
        try:
            return json.loads(self.store.get(self._request_key(tenant, request_id)))["template_id"]
        except ObjectNotFound:
            return None

    def remember_request(self, tenant: str, request_id: str, template_id: str) -> None:
        self.store.put(self._request_key(tenant, request_id), json.dumps({"template_id": template_id}).encode())
