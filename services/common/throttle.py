"""A read-bandwidth cap on an object store: a worker's cache warms share one link of a set rate, first come first served.

Why a worker caps its reads: hundreds of workers warming templates at once would saturate MinIO and the
nodes' NICs, which the edits' own traffic (images in, results out) shares; a cap per worker bounds that. The
cap is announced to the scheduler, whose cost model then prices a cold template at the capped rate, and the
load-balancing benchmark uses it to give template loads the weight they have in production (a disk or
network load of seconds beside edits of seconds, see docs/results/balance.md) on a machine whose local S3
server reads at hundreds of MB/s.

The link is modelled as a queue: a read of n bytes occupies it for n / rate seconds, starting when the read
began or when the reads before it left the link, whichever is later; the caller returns when its bytes have
left the link (or when the inner read finished, if that took longer). Writes are not capped.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Iterator

from .objectstore import ObjectInfo, ObjectStore


class ThrottledStore(ObjectStore):
    """`inner` with get / get_range paced to `bytes_per_second`, all readers of this object sharing the rate."""

    def __init__(self, inner: ObjectStore, bytes_per_second: float, *,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        if not bytes_per_second > 0:
            raise ValueError(f"bytes_per_second must be > 0, got {bytes_per_second!r}")
        self.inner = inner
        self.bytes_per_second = float(bytes_per_second)
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._free_at = 0.0  # when the link has passed every byte handed to it so far
        #: bytes and seconds spent waiting on the cap (beyond the inner read), for logs and tests
        self.bytes_read = 0
        self.seconds_waited = 0.0

    def __repr__(self) -> str:
        return f"ThrottledStore({self.inner!r}, {self.bytes_per_second / 1e6:g} MB/s)"

    def _pace(self, began: float, nbytes: int) -> None:
        with self._lock:
            start = max(began, self._free_at)
            self._free_at = start + nbytes / self.bytes_per_second
            until = self._free_at
            self.bytes_read += nbytes
        delay = until - self._clock()
        if delay > 0:
            with self._lock:
                self.seconds_waited += delay
            self._sleep(delay)

    def get(self, key: str) -> bytes:
        began = self._clock()
        data = self.inner.get(key)
        self._pace(began, len(data))
        return data

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        began = self._clock()
        data = self.inner.get_range(key, offset, length)
        self._pace(began, len(data))
        return data

    # Everything else passes straight through.
    def put(self, key: str, data: bytes, metadata: dict | None = None) -> None:
        self.inner.put(key, data, metadata)

    def stat(self, key: str) -> ObjectInfo:
        return self.inner.stat(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def delete_prefix(self, prefix: str) -> None:
        self.inner.delete_prefix(prefix)

    def close(self) -> None:
        self.inner.close()
