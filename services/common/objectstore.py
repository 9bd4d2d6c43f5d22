"""Object store access for template caches, manifests and images: one interface, a local-directory and an S3 backend.

The engine's `BlobStore` protocol (engine/template_cache.py) is a subset of `ObjectStore`, so either backend
can be handed to `TemplateStore` directly. Both backends behave the same way on purpose (tests run the same
cases against both): user metadata keys are lower-cased ASCII header names, values are ASCII strings;
`delete` of a missing key is a no-op (as in S3); listing is recursive and sorted by key.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tempfile
import urllib.parse
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError

class ObjectStoreError(Exception):
    """Base of every error the object stores raise on purpose."""

    grpc_code = "INTERNAL"


class ObjectNotFound(ObjectStoreError, KeyError):
    """No object under that key."""

    grpc_code = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable
        return str(self.args[0]) if self.args else "object not found"


class StoreUnavailable(ObjectStoreError, ConnectionError):
    """The store cannot be reached or cannot serve (server down, timeout, 5xx, missing bucket)."""

    grpc_code = "UNAVAILABLE"


class StoreAccessDenied(ObjectStoreError, PermissionError):
    """The store rejected our credentials: a deployment problem, not the caller's, hence INTERNAL."""


@dataclass(frozen=True)
class ObjectInfo:
    """What `stat` knows about an object. `etag` is the MD5 hex of single-part uploads (S3 semantics)."""

    size: int
    etag: str
    metadata: dict[str, str] = field(default_factory=dict)


_META_KEY = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def _normalize_metadata(metadata: dict | None) -> dict[str, str]:
    """Validate user metadata the way S3 would store it: header-safe names, ASCII string values."""
    out: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        name = str(key).lower()
        if not _META_KEY.match(name):
            raise ValueError(f"metadata key {key!r}: use letters, digits and '-' only (it travels as an HTTP header)")
        if not isinstance(value, str) or not value.isascii():
            raise ValueError(f"metadata value for {key!r} must be an ASCII string, got {value!r}")
        out[name] = value
    return out


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"invalid object key {key!r}: use non-empty '/'-separated names without '.' or '..'")
    return key


class ObjectStore(ABC):
    """Flat key -> bytes store with per-object string metadata."""

    @abstractmethod
    def put(self, key: str, data: bytes, metadata: dict | None = None) -> None:
        """Store `data` under `key`, replacing any previous object; readers never see a partial object."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The whole object. Raises ObjectNotFound."""

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """`length` bytes from `offset` (fewer at the end of the object). Raises ObjectNotFound."""
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be >= 0")
        return self.get(key)[offset:offset + length]

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size, etag and user metadata. Raises ObjectNotFound."""

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with `prefix` (a plain string prefix, not a directory), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; removing a missing key is not an error."""

    def delete_prefix(self, prefix: str) -> None:
        """Remove every key starting with `prefix`. An empty prefix is refused: it would wipe the store."""
        if not prefix:
            raise ValueError("refusing to delete every object: pass a non-empty prefix")
        for key in list(self.list(prefix)):
            self.delete(key)

    def close(self) -> None:
        """Release connections; the default has nothing to release."""


class LocalObjectStore(ObjectStore):
    """Objects as files under `root` (key = relative path); metadata in JSON sidecars under `root/.objmeta/`."""

    _META_DIR = ".objmeta"
    _TMP_PREFIX = ".tmp-"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        _check_key(key)
        if key.split("/", 1)[0] == self._META_DIR:
            raise ValueError(f"object key {key!r} uses the reserved prefix {self._META_DIR}/")
        return self.root / key

    def _meta_path(self, key: str) -> Path:
        return self.root / self._META_DIR / (key + ".json")

    def _write_atomic(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=self._TMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def put(self, key: str, data: bytes, metadata: dict | None = None) -> None:
        path = self._path(key)
        meta = _normalize_metadata(metadata)
        sidecar = json.dumps({"etag": hashlib.md5(data).hexdigest(), "size": len(data), "metadata": meta})
        try:
            # Data first, then its sidecar: a reader racing a replace may briefly see the old metadata,
            # but never a sidecar describing bytes that are not there yet.
            self._write_atomic(path, bytes(data))
            self._write_atomic(self._meta_path(key), sidecar.encode())
        except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
            raise ValueError(f"{self!r} cannot hold both {key!r} and a key nested under or above it") from exc

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no object {key!r} in {self!r}") from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be >= 0")
        try:
            with open(self._path(key), "rb") as f:
                f.seek(offset)
                return f.read(length)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no object {key!r} in {self!r}") from None

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(f"no object {key!r} in {self!r}")
        size = path.stat().st_size
        try:
            sidecar = json.loads(self._meta_path(key).read_text())
            if sidecar.get("size") == size:
                return ObjectInfo(size=size, etag=sidecar["etag"], metadata=sidecar["metadata"])
        except (FileNotFoundError, ValueError, KeyError):
            pass
        # A file placed by other means (or a stale sidecar): hash what is there, no metadata.
        return ObjectInfo(size=size, etag=hashlib.md5(path.read_bytes()).hexdigest(), metadata={})

    def list(self, prefix: str = "") -> Iterator[str]:
        # Walk only the deepest directory the prefix names, not the whole store.
        start = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        if not start.is_dir():
            return
        keys = []
        for dirpath, dirnames, filenames in os.walk(start):
            if Path(dirpath) == self.root and self._META_DIR in dirnames:
                dirnames.remove(self._META_DIR)
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix) and not name.startswith(self._TMP_PREFIX):
                    keys.append(key)
        yield from sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
            path.unlink()
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            self._meta_path(key).unlink()
        self._prune_empty_dirs(path.parent, self.root)
        self._prune_empty_dirs(self._meta_path(key).parent, self.root / self._META_DIR)

    @staticmethod
    def _prune_empty_dirs(directory: Path, stop: Path) -> None:
        # S3 has no directories; empty ones left behind would only slow down later walks.
        while directory != stop and stop in directory.parents:
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent


class S3ObjectStore(ObjectStore):
    """Objects in one bucket of an S3 server (MinIO in production, the JuiceFS gateway in tests).

    The HTTP client uses a short connect timeout and few retries so that a server that is down surfaces
    as StoreUnavailable within seconds instead of minio's default of minutes. Read timeouts are not
    retried: a server that accepts connections but stalls has already cost `read_timeout`.
    """

    def __init__(self, endpoint: str, access_key: str, secret_key: str, bucket: str, secure: bool = False,
                 create_bucket: bool = True, *, region: str = "us-east-1", connect_timeout: float = 2.0,
                 read_timeout: float = 30.0, retries: int = 2, part_size: int = 8 * 1024 * 1024):
        self.endpoint, self.bucket, self.secure = endpoint, bucket, secure
        self.part_size = part_size
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            retries=urllib3.Retry(total=retries, read=0, backoff_factor=0.1, status_forcelist=[500, 502, 503, 504]),
            maxsize=8,
        )
        # A fixed region skips minio's GetBucketLocation round trip before the first request.
        self._client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure,
                             region=region, http_client=self._http)
        if create_bucket:
            self.ensure_bucket()

    def __repr__(self) -> str:  # never show the credentials
        return f"S3ObjectStore({self._where()})"

    def _where(self, key: str | None = None) -> str:
        scheme = "https" if self.secure else "http"
        return f"{scheme}://{self.endpoint}/{self.bucket}" + (f"/{key}" if key else "")

    @contextlib.contextmanager
    def _errors(self, action: str, key: str | None = None):
        """Translate minio/urllib3 failures into this module's typed errors, naming endpoint, bucket and key."""
        where = self._where(key)
        try:
            yield
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise ObjectNotFound(f"no object {key!r} in {self._where()}") from None
            if exc.code == "NoSuchBucket":
                raise StoreUnavailable(f"{action} {where}: bucket {self.bucket!r} does not exist on "
                                       f"{self.endpoint} (create it, or open the store with create_bucket=True)") from exc
            if exc.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StoreAccessDenied(f"{action} {where}: {exc.code}; check the S3 access and secret keys") from exc
            raise ObjectStoreError(f"{action} {where}: S3 error {exc.code}: {exc.message}") from exc
        except (ServerError, InvalidResponseError) as exc:
            raise StoreUnavailable(f"{action} {where}: server answered {exc}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StoreUnavailable(f"{action} {where}: cannot reach the S3 server at {self.endpoint} ({exc})") from exc

    def ensure_bucket(self) -> None:
        with self._errors("create bucket"):
            if self._client.bucket_exists(self.bucket):
                return
            try:
                self._client.make_bucket(self.bucket)
            except S3Error as exc:  # another process created it between our check and our create
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def put(self, key: str, data: bytes, metadata: dict | None = None) -> None:
        _check_key(key)
        headers = {f"x-amz-meta-{k}": v for k, v in _normalize_metadata(metadata).items()}
        with self._errors("put", key):
            self._client.put_object(self.bucket, key, io.BytesIO(data), len(data), metadata=headers,
                                    part_size=self.part_size)

    def _read(self, key: str, action: str, **range_args) -> bytes:
        _check_key(key)
        with self._errors(action, key):
            response = self._client.get_object(self.bucket, key, **range_args)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def get(self, key: str) -> bytes:
        return self._read(key, "get")

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be >= 0")
        if length == 0:
            return b""
        # A range starting past the end is an InvalidRange error in S3; answer like a file read would.
        size = self.stat(key).size
        if offset >= size:
            return b""
        return self._read(key, "get range", offset=offset, length=min(length, size - offset))

    def stat(self, key: str) -> ObjectInfo:
        _check_key(key)
        with self._errors("stat", key):
            obj = self._client.stat_object(self.bucket, key)
        prefix = "x-amz-meta-"
        metadata = {k.lower()[len(prefix):]: v for k, v in (obj.metadata or {}).items()
                    if k.lower().startswith(prefix)}
        return ObjectInfo(size=obj.size, etag=(obj.etag or "").strip('"'), metadata=metadata)

    def list(self, prefix: str = "") -> Iterator[str]:
        with self._errors("list", prefix or None):
            for obj in self._client.list_objects(self.bucket, prefix=prefix or None, recursive=True):
                if not obj.is_dir:
                    yield obj.object_name

    def delete(self, key: str) -> None:
        _check_key(key)
        with self._errors("delete", key):
            self._client.remove_object(self.bucket, key)

    def delete_prefix(self, prefix: str) -> None:
        if not prefix:
            raise ValueError("refusing to delete every object: pass a non-empty prefix")
        # Materialise the listing first: deleting while paging through the same listing can skip keys.
        keys = list(self.list(prefix))
        with self._errors("delete prefix", prefix):
            failures = list(self._client.remove_objects(self.bucket, (DeleteObject(k) for k in keys)))
        if failures:
            first = failures[0]
            raise ObjectStoreError(f"delete prefix {self._where(prefix)}: {len(failures)} objects not deleted, "
                                   f"first {first.name!r}: {first.code} {first.message}")

    def close(self) -> None:
        self._http.clear()


def open_store(url: str | os.PathLike, **s3_options) -> ObjectStore:
    """A store from a URL.

    - `file:///abs/path` or a plain path -> LocalObjectStore
    - `s3://ACCESS:SECRET@host:port/bucket` -> S3ObjectStore over http; `s3+https://...` over TLS.
      Credentials missing from the URL come from INSTGENIE_S3_ACCESS_KEY / INSTGENIE_S3_SECRET_KEY.
    Extra keyword arguments go to S3ObjectStore (e.g. create_bucket=False, connect_timeout=...).
    """
    text = os.fspath(url)
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URL {text!r} names host {parsed.netloc!r}; use file:///absolute/path")
        return LocalObjectStore(urllib.parse.unquote(parsed.path))
    if parsed.scheme in ("s3", "s3+http", "s3+https"):
        bucket = parsed.path.strip("/")
        if not bucket or "/" in bucket:
            raise ValueError(f"S3 URL {_redact(text)!r} must name exactly one bucket: s3://KEY:SECRET@host:port/bucket")
        if not parsed.hostname:
            raise ValueError(f"S3 URL {_redact(text)!r} has no host")
        access = urllib.parse.unquote(parsed.username or "") or os.environ.get("INSTGENIE_S3_ACCESS_KEY", "")
        secret = urllib.parse.unquote(parsed.password or "") or os.environ.get("INSTGENIE_S3_SECRET_KEY", "")
        if not access or not secret:
            raise ValueError(f"S3 URL {_redact(text)!r} has no credentials: put them in the URL or set "
                             "INSTGENIE_S3_ACCESS_KEY and INSTGENIE_S3_SECRET_KEY")
        endpoint = parsed.netloc.rpartition("@")[2]  # host:port as written (keeps IPv6 brackets)
        return S3ObjectStore(endpoint, access, secret, bucket, secure=parsed.scheme == "s3+https", **s3_options)
    if parsed.scheme and len(parsed.scheme) > 1:  # a one-letter scheme is a Windows drive, i.e. a path
        raise ValueError(f"unsupported store URL scheme {parsed.scheme!r} in {_redact(text)!r}: use file:// or s3://")
    return LocalObjectStore(text)


def _redact(url: str) -> str:
    """The URL with its secret replaced, for error messages."""
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)
