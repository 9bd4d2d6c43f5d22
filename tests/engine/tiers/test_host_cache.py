"""Host-memory tier: LRU by bytes, leases, deduplicated concurrent loads, per-key waiting, error propagation."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from instgenie.engine.tiers.host_cache import HostCache, tensor_nbytes


def shard(nbytes: int, fill: int = 0) -> dict[str, torch.Tensor]:
    return {"t": torch.full((nbytes,), fill, dtype=torch.uint8)}


class CountingLoader:
    """loader_fn(key) that counts calls and can be held at a gate until the test opens it."""

    def __init__(self, nbytes: int = 100, gated: bool = False, fail: Exception | None = None):
        self.nbytes, self.fail = nbytes, fail
        self.calls: list = []
        self.started = threading.Event()
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self._lock = threading.Lock()

    def __call__(self, key):
        with self._lock:
            self.calls.append(key)
        self.started.set()
        assert self.gate.wait(10), "test never opened the gate"
        if self.fail is not None:
            raise self.fail
        return shard(self.nbytes)


@pytest.fixture()
def cache():
    with HostCache(budget_bytes=300) as c:
        yield c


def test_bytes_are_the_sum_of_tensor_nbytes():
    value = {"k": torch.zeros(10, 4, dtype=torch.float32), "v": torch.zeros(10, dtype=torch.float16)}
    assert tensor_nbytes(value) == 160 + 20
    with HostCache(10_000) as cache:
        cache.put("a", value)
        assert cache.bytes == 180 and cache.stats().bytes == 180


def test_lru_eviction_order_and_byte_budget(cache):
    for key in "abc":
        cache.put(key, shard(100))
    assert cache.get("a") is not None  # a becomes the most recently used
    cache.put("d", shard(100))
    assert cache.keys() == ["c", "a", "d"]  # b was the least recently used
    stats = cache.stats()
    assert stats.evictions == 1 and stats.bytes == 300 and stats.entries == 3
    cache.put("e", shard(250))  # needs room for 250: evicts c, a and d, oldest first
    assert cache.keys() == ["e"] and cache.bytes == 250


def test_value_larger_than_the_budget_is_returned_but_not_kept(cache):
    assert tensor_nbytes(cache.get("huge", lambda k: shard(1000))) == 1000
    assert "huge" not in cache and cache.bytes == 0


def test_leased_entries_are_never_evicted(cache):
    cache.put("a", shard(100))
    with cache.lease("a") as value:
        for i in range(10):
            cache.put(i, shard(100))
        assert "a" in cache and cache.peek("a") is value
        assert cache.bytes <= 300
    cache.put("z", shard(300))  # once released, "a" is evictable again
    assert "a" not in cache


def test_over_budget_when_everything_is_leased_is_reported(cache):
    with cache.lease("a", lambda k: shard(200)), cache.lease("b", lambda k: shard(200)):
        stats = cache.stats()
        assert stats.bytes == 400 and stats.leased == 2
        assert stats.over_budget_bytes == 100 and stats.budget_overruns == 1
    stats = cache.stats()  # releasing the leases lets eviction bring it back under budget
    assert stats.bytes <= 300 and stats.over_budget_bytes == 0 and stats.leased == 0


def test_lease_loads_on_demand(cache):
    loader = CountingLoader()
    with cache.lease("k", loader) as value:
        assert tensor_nbytes(value) == 100
    with cache.lease("k", loader):
        pass
    assert loader.calls == ["k"]


def test_concurrent_requests_for_one_key_share_one_load(cache):
    loader = CountingLoader(gated=True)
    futures = cache.prefetch(["k"], loader)
    assert loader.started.wait(5)
    results, threads = [], [threading.Thread(target=lambda: results.append(cache.get("k", loader))) for _ in range(5)]
    for thread in threads:
        thread.start()
    time.sleep(0.05)
    assert cache.prefetch(["k"], loader)["k"] is futures["k"]  # a second prefetch joins too
    loader.gate.set()
    for thread in threads:
        thread.join(5)
    assert loader.calls == ["k"]
    assert len(results) == 5 and all(r is results[0] for r in results) and futures["k"].result() is results[0]
    stats = cache.stats()
    assert stats.prefetches == 1 and stats.loads == 1 and stats.joined == 5
    cache.get("k")
    assert cache.stats().hits == 1


def test_get_waits_only_for_its_own_key():
    with HostCache(10_000, prefetch_workers=1) as cache:
        slow = CountingLoader(gated=True)
        cache.prefetch(["slow"], slow)
        assert slow.started.wait(5)  # the only prefetch worker is now stuck on "slow"
        cache.prefetch(["queued"], CountingLoader())  # queued behind it
        start = time.monotonic()
        assert tensor_nbytes(cache.get("fresh", CountingLoader(), timeout=5)) == 100
        assert tensor_nbytes(cache.get("queued", timeout=5)) == 100  # promoted to a demand worker
        assert time.monotonic() - start < 2 and cache.is_loading("slow")
        slow.gate.set()
        assert tensor_nbytes(cache.get("slow", timeout=5)) == 100


def test_timeout_leaves_the_load_running_and_cached_later(cache):
    loader = CountingLoader(gated=True)
    with pytest.raises(TimeoutError, match="'k'"):
        cache.get("k", loader, timeout=0.05)
    loader.gate.set()
    assert tensor_nbytes(cache.get("k", loader, timeout=5)) == 100
    assert loader.calls == ["k"]


def test_loader_error_reaches_every_waiter_and_is_not_cached(cache):
    failing = CountingLoader(gated=True, fail=OSError("object store down"))
    errors = []

    def waiter():
        try:
            cache.get("k", failing, timeout=5)
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=waiter) for _ in range(3)]
    for thread in threads:
        thread.start()
    assert failing.started.wait(5)
    time.sleep(0.05)
    failing.gate.set()
    for thread in threads:
        thread.join(5)
    assert len(errors) == 3 and all("object store down" in str(e) for e in errors)
    assert failing.calls == ["k"] and "k" not in cache and not cache.is_loading("k")
    assert cache.stats().load_errors == 1
    assert tensor_nbytes(cache.get("k", CountingLoader())) == 100  # the next request retries


def test_missing_key_without_loader_is_a_key_error(cache):
    with pytest.raises(KeyError):
        cache.get("nope")


def test_invalidate_during_load_does_not_cache_stale_data(cache):
    loader = CountingLoader(gated=True)
    future = cache.prefetch(["k"], loader)["k"]
    assert loader.started.wait(5)
    cache.invalidate("k")
    loader.gate.set()
    assert tensor_nbytes(future.result(5)) == 100  # its waiters still get their value
    assert "k" not in cache


def test_invalidate_where_drops_one_templates_steps(cache):
    for step in range(2):
        cache.put(("t1", step), shard(50))
        cache.put(("t2", step), shard(50))
    assert cache.invalidate_where(lambda key: key[0] == "t1") == 2
    assert cache.keys() == [("t2", 0), ("t2", 1)] and cache.bytes == 100


def test_close_fails_queued_loads_instead_of_hanging():
    cache = HostCache(10_000, prefetch_workers=1)
    blocker = CountingLoader(gated=True)
    cache.prefetch(["running"], blocker)
    assert blocker.started.wait(5)
    queued = cache.prefetch(["queued"], CountingLoader())["queued"]
    closer = threading.Thread(target=cache.close)
    closer.start()
    with pytest.raises(RuntimeError, match="closed"):
        queued.result(5)
    blocker.gate.set()
    closer.join(5)
    assert not closer.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        cache.prefetch(["x"], CountingLoader())


def test_pinning_is_a_no_op_without_cuda(cache):
    value = shard(10)
    cache.put("a", value)
    if not torch.cuda.is_available():
        assert cache.peek("a")["t"] is value["t"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_loaded_and_put_shards_are_pinned_and_copy_asynchronously():
    with HostCache(budget_bytes=10 * 2**20) as cache:
        cache.put("put", shard(2**20, fill=3))
        loaded = cache.get("loaded", CountingLoader(nbytes=2**20), timeout=10)
        for value in (cache.peek("put"), loaded):
            assert value["t"].is_pinned()
            device = value["t"].to("cuda", non_blocking=True)
            torch.cuda.synchronize()
            assert torch.equal(device.cpu(), value["t"])
        assert cache.stats().bytes == 2 * 2**20  # pinning does not change what is counted
