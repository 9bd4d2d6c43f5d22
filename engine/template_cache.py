"""Template caches on a blob store: one safetensors shard per denoising step plus a JSON manifest.

Layout under `templates/<template_id>/`:
  base.safetensors         image_latents (1, N, 4C) and noise (1, N, 4C) of the template run (+ cond tokens)
  step-0000.safetensors    per block: `kv.<b>.k`, `kv.<b>.v` (G, N, heads, head_dim)  or  `y.<b>` (G, N, hidden)
  ...
  manifest.json            written last, so a template is visible only once every shard is in place;
                           checksummed or signed, and schema-checked on every read (manifest_schema.py)
G is the number of guidance branches (2 for true CFG: unconditional, conditional; else 1).

Size of the step shards' tensor data (the header of each safetensors file adds a few KiB):
  KV mode: 2 * steps * G * blocks * N * hidden * bytes_per_element
  Y mode :     steps * G * blocks * N * hidden * bytes_per_element
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import CacheIntegrityError, CacheUnavailableError, TemplateNotFoundError
from .ids import ID_PATTERN, validate_template_id
from .manifest_schema import BASE_SHARD, FORMAT_VERSION, step_shard, verified_manifest_dict


_ID_RE = re.compile(ID_PATTERN)
__all__ = ["BASE_SHARD", "FORMAT_VERSION", "BlobStore", "DirectoryBlobStore", "TemplateManifest", "TemplateStore",
           "cache_bytes", "step_shard"]


def cache_bytes(mode: str, steps: int, branches: int, blocks: int, tokens: int, hidden: int, element_bytes: int) -> int:
    """Bytes of cached tensor data of one template (see the module docstring)."""
    per_block = (2 if mode == "kv" else 1) * tokens * hidden * element_bytes
    return steps * branches * blocks * per_block


class BlobStore(Protocol):
    """The minimum the template store needs from an object store (services provide an S3 one)."""

    def put(self, key: str, data: bytes, metadata: dict | None = None) -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> Iterator[str]: ...
    def delete_prefix(self, prefix: str) -> None: ...


class DirectoryBlobStore:
    """A BlobStore on a local directory; writes are atomic (temp file + rename)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"key {key!r} escapes the store root")
        return path

    def put(self, key: str, data: bytes, metadata: dict | None = None) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> Iterator[str]:
        base = self.root.resolve()
        for p in sorted(base.rglob("*")):
            key = p.relative_to(base).as_posix()
            if p.is_file() and key.startswith(prefix) and not p.name.startswith(".tmp-"):
                yield key

    def delete_prefix(self, prefix: str) -> None:
        for key in list(self.list(prefix)):
            self._path(key).unlink(missing_ok=True)


@dataclass
class TemplateManifest:
    """What a template cache is and what it is valid for.

    Stored checksummed (`checksum`: sha256 over the canonical JSON of every other field, or an HMAC-SHA256
    when the store has a signing key); the checksum covers the shards' sha256 digests, so one verified
    manifest vouches for every byte of the cache. `from_json` refuses anything that does not verify or does
    not match the schema with CacheIntegrityError: an edited field is never trusted.
    """

    template_id: str
    model_id: str
    config_hash: str
    resolution: tuple[int, int]
    steps: int
    seed: int
    prompt: str
    cache_mode: str
    dtype: str
    guidance: str
    guidance_scale: float
    branches: int
    num_blocks: int
    image_tokens: int
    text_tokens: int
    hidden: int
    scheduler: dict
    shards: dict[str, dict] = field(default_factory=dict)  # name -> {"sha256", "bytes"}
    format_version: int = FORMAT_VERSION
    created_at: float = 0.0
    #: sha256 of the template image as registered (after conversion): re-registering the same inputs is a no-op
    image_sha256: str = ""
    checksum: str = ""

    def to_json(self, key: bytes | None = None) -> bytes:
        """The stored form; sets `checksum` (HMAC-SHA256 with `key`, else SHA256) over every other field."""
        d = asdict(self)
        d.pop("checksum")
        d = json.loads(_canonical(d))  # what a reader will parse (tuples become lists, odd values strings)
        self.checksum = _checksum(d, key)
        d["checksum"] = self.checksum
        return json.dumps(d, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, key: bytes | None = None, template_id: str | None = None) -> "TemplateManifest":
        """Parse, verify the checksum and validate the schema; any failure is CacheIntegrityError."""
        return cls(**verified_manifest_dict(data, key, template_id))

    def registration(self) -> tuple:
        """What decides the cache's content: equal for two registrations that write identical caches."""
        return (self.image_sha256, self.model_id, self.config_hash, tuple(self.resolution), self.steps, self.seed,
                self.prompt, self.cache_mode, self.dtype, self.guidance, self.guidance_scale)

    @property
    def expected_cache_bytes(self) -> int:
        element = torch.finfo(getattr(torch, self.dtype)).bits // 8
        return cache_bytes(self.cache_mode, self.steps, self.branches, self.num_blocks, self.image_tokens,
                           self.hidden, element)


def _canonical(d: dict) -> str:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)


def _checksum(d: dict, key: bytes | None) -> str:
    payload = _canonical(d).encode()
    if key is None:
        return "sha256:" + hashlib.sha256(payload).hexdigest()
    return "hmac-sha256:" + hmac.new(key, payload, hashlib.sha256).hexdigest()


class TemplateStore:
    """Reads and writes template caches on a BlobStore, checking every shard's sha256 on read.

    A store that cannot be reached (any ConnectionError/TimeoutError of the blob store) surfaces as
    CacheUnavailableError, so callers can tell "try later / compute without cache" from "no such template".
    Template ids are validated (ids.py) before they become part of a key. Manifests are verified on every
    read (checksum + schema, see manifest_schema.py); with `signing_key` they are HMAC-signed and unsigned or
    wrongly signed manifests are refused. Safe to use from several threads (it holds no mutable state).
    """

    def __init__(self, blobs: BlobStore, prefix: str = "templates", signing_key: bytes | None = None):
        self.blobs = blobs
        self.prefix = prefix.rstrip("/")
        if signing_key is not None and (not isinstance(signing_key, bytes) or len(signing_key) < 16):
            raise ValueError("signing_key must be at least 16 bytes")
        self.signing_key = signing_key

    def _get(self, key: str) -> bytes:
        try:
            return self.blobs.get(key)
        except (ConnectionError, TimeoutError) as exc:
            raise CacheUnavailableError(f"template cache store unreachable while reading {key!r}: {exc}") from exc

    def _key(self, template_id: str, name: str) -> str:
        return f"{self.prefix}/{validate_template_id(template_id)}/{name}"

    def put_shard(self, manifest: TemplateManifest, name: str, tensors: dict[str, torch.Tensor]) -> int:
        data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
        self.blobs.put(self._key(manifest.template_id, name), data)
        manifest.shards[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        return len(data)

    def commit(self, manifest: TemplateManifest) -> None:
        """Publish the template: its manifest goes last, after every shard."""
        self.blobs.put(self._key(manifest.template_id, "manifest.json"), manifest.to_json(self.signing_key))

    def exists(self, template_id: str) -> bool:
        try:
            return self.blobs.exists(self._key(template_id, "manifest.json"))
        except (ConnectionError, TimeoutError) as exc:
            raise CacheUnavailableError(f"template cache store unreachable: {exc}") from exc

    def manifest(self, template_id: str) -> TemplateManifest:
        key = self._key(template_id, "manifest.json")
        try:
            data = self._get(key)
        except KeyError:
            raise TemplateNotFoundError(f"template {template_id!r} does not exist; register it first",
                                        field="template_id") from None
        return TemplateManifest.from_json(data, self.signing_key, template_id)

    def shard(self, manifest: TemplateManifest, name: str) -> dict[str, torch.Tensor]:
        info = manifest.shards.get(name)
        if info is None:
            raise CacheIntegrityError(f"template {manifest.template_id!r} has no shard {name!r} in its manifest")
        try:
            data = self._get(self._key(manifest.template_id, name))
        except KeyError:
            raise CacheIntegrityError(f"shard {name!r} of template {manifest.template_id!r} is missing") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != info["sha256"]:
            raise CacheIntegrityError(
                f"shard {name!r} of template {manifest.template_id!r} is corrupt "
                f"(sha256 {digest[:12]}..., manifest says {info['sha256'][:12]}...); re-register the template"
            )
        try:
            return st_load(data)
        except Exception as exc:  # noqa: BLE001 - a parse failure of verified bytes is still data loss
            raise CacheIntegrityError(f"shard {name!r} of template {manifest.template_id!r} cannot be parsed: {exc}") from exc

    def step(self, manifest: TemplateManifest, step: int) -> dict[str, torch.Tensor]:
        return self.shard(manifest, step_shard(step))

    def list(self) -> list[str]:
        ids = set()
        for key in self.blobs.list(self.prefix + "/"):
            parts = key[len(self.prefix) + 1:].split("/")
            if len(parts) == 2 and parts[1] == "manifest.json" and _ID_RE.fullmatch(parts[0]):
                ids.add(parts[0])
        return sorted(ids)

    def delete(self, template_id: str) -> None:
        if not self.exists(template_id):
            raise TemplateNotFoundError(f"template {template_id!r} does not exist", field="template_id")
        # The manifest goes first so readers stop seeing the template before its shards vanish.
        self.blobs.delete_prefix(self._key(template_id, "manifest.json"))
        self.blobs.delete_prefix(self._key(template_id, ""))

    def discard(self, template_id: str) -> None:
        """Remove whatever an uncommitted registration wrote (no manifest: readers never saw it)."""
        self.blobs.delete_prefix(self._key(template_id, ""))
