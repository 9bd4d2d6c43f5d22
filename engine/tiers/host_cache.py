"""Host-memory cache tier: an LRU by bytes of template cache shards, with leases and deduplicated prefetch.

The worker keys entries by (template_id, step) and stores the step shard (dict[str, Tensor]). A request
prefetches its template's shards the moment it is assigned, so by the time it runs the loads from the
object store have (mostly) happened; while it runs it *leases* the shards it is using so that other
requests' loads cannot evict them from under it.

Loads never run under the cache lock. Every key has at most one load in flight; everyone who wants
that key waits on the same future. Prefetches run on a small pool; a demand load (`get` with a loader)
runs on a separate pool so that a request never queues behind other templates' prefetches.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

Loader = Callable[[Hashable], Any]


def tensor_nbytes(value: Any) -> int:
    """Bytes of tensor data in a tensor, a mapping/sequence of tensors, or a bytes-like object."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, Mapping):
        return sum(tensor_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_nbytes(v) for v in value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    raise TypeError(f"cannot size a {type(value).__name__}; pass size_fn= to HostCache")


def pin_tensors(value: Any) -> Any:
    """Page-locked copies of the tensors in `value`, so host->device copies can be asynchronous (CUDA only)."""
    if isinstance(value, torch.Tensor):
        return value if value.is_pinned() else value.pin_memory()
    if isinstance(value, Mapping):
        return {k: pin_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(pin_tensors(v) for v in value)
    return value


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the cache counters. `misses` includes requests that joined an in-flight load (`joined`)."""

    hits: int
    misses: int
    joined: int
    evictions: int
    prefetches: int
    loads: int
    load_errors: int
    bytes: int
    bytes_loaded: int
    budget_bytes: int
    entries: int
    leased: int
    inflight: int
    over_budget_bytes: int
    budget_overruns: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class _Entry:
    __slots__ = ("value", "nbytes", "leases")

    def __init__(self, value: Any, nbytes: int, leases: int = 0):
        self.value, self.nbytes, self.leases = value, nbytes, leases


class _Load:
    """One in-flight load. `claimed` is set by whichever worker runs it (a prefetch may also be promoted)."""

    __slots__ = ("future", "loader_fn", "claimed")

    def __init__(self, loader_fn: Loader):
        self.future: Future = Future()
        self.loader_fn, self.claimed = loader_fn, False


class HostCache:
    """LRU of host-memory values bounded by `budget_bytes` (sum of tensor nbytes). Thread-safe.

    Leased entries are never evicted. If leased entries alone exceed the budget the cache goes over
    budget (it cannot drop data a running request uses): that is logged once per episode and counted
    in `stats().budget_overruns`, with the excess in `stats().over_budget_bytes`.
    """

    def __init__(self, budget_bytes: int, *, prefetch_workers: int = 2, demand_workers: int = 2,
                 pin_memory: bool = True, size_fn: Callable[[Any], int] = tensor_nbytes, name: str = "host-cache"):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.name = name
        # Pinning is only meaningful (and only possible) with a CUDA device; on CPU it would just copy.
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self._size_fn = size_fn
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()  # oldest first
        self._inflight: dict[Hashable, _Load] = {}
        self._bytes = 0
        self._over_budget = False
        self._closed = False
        self._counts = dict(hits=0, misses=0, joined=0, evictions=0, prefetches=0, loads=0, load_errors=0,
                            bytes_loaded=0, budget_overruns=0)
        self._prefetch_pool = ThreadPoolExecutor(prefetch_workers, thread_name_prefix=f"{name}-prefetch")
        self._demand_pool = ThreadPoolExecutor(demand_workers, thread_name_prefix=f"{name}-demand")

    # -- lookups --------------------------------------------------------------------------------------
    def get(self, key: Hashable, loader_fn: Loader | None = None, timeout: float | None = None) -> Any:
        """The value of `key`: resident, or after waiting for that key's load only.

        Starts a load with `loader_fn(key)` if none is in flight. Raises KeyError if the key is neither
        resident nor loading and no loader is given, TimeoutError after `timeout` seconds (the load goes
        on and its result is cached), or whatever the loader raised.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self._counts["hits"] += 1
                return entry.value
            self._counts["misses"] += 1
            load = self._inflight.get(key)
            if load is not None:
                self._counts["joined"] += 1
                if not load.claimed:
                    # Still queued behind other prefetches: let a demand worker race for it.
                    self._demand_pool.submit(self._run_load, key, load)
            elif loader_fn is None:
                raise KeyError(f"{key!r} is not in {self.name} and no loader was given")
            else:
                self._check_open()
                load = self._start_load_locked(key, loader_fn, self._demand_pool)
        try:
            return load.future.result(timeout)
        except TimeoutError:
            raise TimeoutError(f"{self.name}: {key!r} not loaded within {timeout}s") from None

    def peek(self, key: Hashable) -> Any | None:
        """The resident value or None, without touching LRU order or counters."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.value

    @contextlib.contextmanager
    def lease(self, key: Hashable, loader_fn: Loader | None = None, timeout: float | None = None) -> Iterator[Any]:
        """`with cache.lease(key, loader) as shard:` the entry cannot be evicted inside the block."""
        value = self.get(key, loader_fn, timeout)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                # Evicted between its load finishing and now: we hold the value, so put it back, leased.
                entry = _Entry(value, self._size_fn(value), leases=1)
                self._add_locked(key, entry)
            else:
                entry.leases += 1
                value = entry.value
        try:
            yield value
        finally:
            with self._lock:
                entry.leases -= 1
                if entry.leases == 0 and self._entries.get(key) is entry:
                    self._evict_locked()  # evictions deferred while it was leased may happen now

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def keys(self) -> list[Hashable]:
        """Resident keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def is_loading(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._inflight

    # -- filling --------------------------------------------------------------------------------------
    def prefetch(self, keys: Iterable[Hashable], loader_fn: Loader) -> dict[Hashable, Future]:
        """Start loading every key that is neither resident nor loading; return a future per key.

        Resident keys are marked recently used (a request is about to need them). Do not cancel the
        returned futures: they are shared with every other waiter of the key. Prefetching more than the
        budget holds evicts the earliest of them again.
        """
        futures: dict[Hashable, Future] = {}
        with self._lock:
            self._check_open()
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    futures[key] = Future()
                    futures[key].set_result(entry.value)
                elif key in self._inflight:
                    futures[key] = self._inflight[key].future
                else:
                    self._counts["prefetches"] += 1
                    futures[key] = self._start_load_locked(key, loader_fn, self._prefetch_pool).future
        return futures

    def put(self, key: Hashable, value: Any) -> None:
        """Insert or replace `key` directly (e.g. shards of a template this worker just registered)."""
        value = pin_tensors(value) if self.pin_memory else value
        nbytes = self._size_fn(value)
        with self._lock:
            self._inflight.pop(key, None)  # a load still running would bring back older data: drop its result
            old = self._entries.get(key)
            if old is None:
                self._add_locked(key, _Entry(value, nbytes))
                return
            # Update in place: current leaseholders release this very entry object when they are done.
            self._bytes += nbytes - old.nbytes
            old.value, old.nbytes = value, nbytes
            self._entries.move_to_end(key)
            self._evict_locked()

    def invalidate(self, key: Hashable) -> bool:
        """Forget `key` (leased or not: holders keep their reference); a load in flight is not cached."""
        with self._lock:
            self._inflight.pop(key, None)
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._bytes -= entry.nbytes
                self._evict_locked()
            return entry is not None

    def invalidate_where(self, predicate: Callable[[Hashable], bool]) -> int:
        """Forget every key (resident or loading) for which `predicate(key)`, e.g. one template's steps."""
        with self._lock:
            for key in [k for k in self._inflight if predicate(k)]:
                del self._inflight[key]
            doomed = [k for k in self._entries if predicate(k)]
            for key in doomed:
                self._bytes -= self._entries.pop(key).nbytes
            self._evict_locked()
            return len(doomed)

    def clear(self) -> None:
        """Drop every entry that is not leased."""
        with self._lock:
            for key in [k for k, e in self._entries.items() if not e.leases]:
                self._bytes -= self._entries.pop(key).nbytes
            self._evict_locked()

    # -- accounting -----------------------------------------------------------------------------------
    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(**self._counts, bytes=self._bytes, budget_bytes=self.budget_bytes,
                              entries=len(self._entries), leased=sum(1 for e in self._entries.values() if e.leases),
                              inflight=len(self._inflight), over_budget_bytes=max(0, self._bytes - self.budget_bytes))

    # -- lifecycle ------------------------------------------------------------------------------------
    def close(self, wait: bool = True) -> None:
        """Stop loading: queued loads fail with RuntimeError for their waiters; running ones finish if `wait`."""
        with self._lock:
            self._closed = True
            pending = [(k, l) for k, l in self._inflight.items() if not l.claimed]
            for key, load in pending:
                load.claimed = True
                del self._inflight[key]
        for key, load in pending:
            load.future.set_exception(RuntimeError(f"{self.name} closed before {key!r} was loaded"))
        self._prefetch_pool.shutdown(wait=wait, cancel_futures=True)
        self._demand_pool.shutdown(wait=wait, cancel_futures=True)

    def __enter__(self) -> "HostCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals (callers hold self._lock unless noted) ---------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name} is closed")

    def _start_load_locked(self, key: Hashable, loader_fn: Loader, pool: ThreadPoolExecutor) -> _Load:
        load = _Load(loader_fn)
        self._inflight[key] = load
        pool.submit(self._run_load, key, load)
        return load

    def _run_load(self, key: Hashable, load: _Load) -> None:
        """Runs on a pool thread, without the lock held while loading."""
        with self._lock:
            if load.claimed:  # the other pool got to it first
                return
            load.claimed = True
        try:
            value = load.loader_fn(key)
            if self.pin_memory:
                value = pin_tensors(value)
            nbytes = self._size_fn(value)
        except BaseException as exc:  # every waiter must wake up, whatever the loader raised
            with self._lock:
                if self._inflight.get(key) is load:
                    del self._inflight[key]
                self._counts["load_errors"] += 1
            load.future.set_exception(exc)
            return
        with self._lock:
            self._counts["loads"] += 1
            self._counts["bytes_loaded"] += nbytes
            # Only cache it if nobody invalidated or replaced the key while it loaded.
            if self._inflight.get(key) is load:
                del self._inflight[key]
                self._add_locked(key, _Entry(value, nbytes))
        load.future.set_result(value)

    def _add_locked(self, key: Hashable, entry: _Entry) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes
        self._entries[key] = entry
        self._bytes += entry.nbytes
        self._evict_locked()

    def _evict_locked(self) -> None:
        if self._bytes > self.budget_bytes:
            for key in list(self._entries):  # least recently used first
                if self._bytes <= self.budget_bytes:
                    break
                entry = self._entries[key]
                if entry.leases:
                    continue
                del self._entries[key]
                self._bytes -= entry.nbytes
                self._counts["evictions"] += 1
        over = self._bytes > self.budget_bytes
        if over and not self._over_budget:
            self._counts["budget_overruns"] += 1
            logger.warning("%s over budget: %d bytes resident, budget %d; the rest is leased by running requests",
                           self.name, self._bytes, self.budget_bytes)
        self._over_budget = over
