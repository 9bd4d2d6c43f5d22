"""Block loader: correct tensors in order, skipped blocks, bandwidth-model timing, buffer limit, errors, shutdown.

Timing asserts are deliberately loose (2 shared CPU cores): they check the model is applied, not its precision.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from instgenie.engine.tiers.loader import BandwidthModel, BlockLoader, BlockLoadError, blocks_from_shard
from instgenie.engine.tiers.planner import plan_blocks, simulate

MIB = 1024 * 1024


def make_blocks(n: int, nbytes: int = 64 * 1024) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [{f"kv.{i}.k": torch.rand(nbytes // 8, generator=gen), f"kv.{i}.v": torch.rand(nbytes // 8, generator=gen)}
            for i in range(n)]


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def test_blocks_from_shard_groups_tensors_by_block():
    shard = {"kv.0.k": torch.zeros(1), "kv.0.v": torch.zeros(1), "kv.1.k": torch.zeros(1), "y.1": torch.zeros(1),
             "other": torch.zeros(1)}
    blocks = blocks_from_shard(shard, 2)
    assert sorted(blocks[0]) == ["kv.0.k", "kv.0.v"] and sorted(blocks[1]) == ["kv.1.k", "y.1"]


def test_delivers_each_block_and_skips_full_compute_blocks():
    blocks = make_blocks(4)
    use_cache = [True, False, True, True]
    with BlockLoader(blocks, use_cache) as loader:
        for i, cached in enumerate(use_cache):
            if not cached:
                with pytest.raises(ValueError, match="computed in full"):
                    loader.wait(i)
                continue
            got = loader.wait(i, timeout=5)
            assert got.keys() == blocks[i].keys()
            assert all(torch.equal(got[name], blocks[i][name]) for name in got)
            assert all(got[name].data_ptr() != blocks[i][name].data_ptr() for name in got)  # a real copy
            loader.release(i)
    report = loader.report()
    assert report.blocks[1].skipped and report.blocks[1].load_start is None
    assert [b.nbytes for b in report.blocks] == [64 * 1024, 0, 64 * 1024, 64 * 1024]


def test_buffers_are_reused_and_valid_until_release():
    blocks = make_blocks(4)
    with BlockLoader(blocks, buffers=2) as loader:
        pointers = []
        for i in range(4):
            got = loader.wait(i, timeout=5)
            pointers.append(got[f"kv.{i}.k"].data_ptr())
            loader.release(i)
        assert pointers[0] == pointers[2] and pointers[1] == pointers[3]  # ping-pong between two buffers
        with pytest.raises(BlockLoadError, match="released"):
            loader.wait(1)


def test_bandwidth_model_sets_the_transfer_time():
    bandwidth = BandwidthModel(bytes_per_second=20 * MIB, latency_s=0.01)
    blocks = make_blocks(4, nbytes=1 * MIB)
    modelled = bandwidth.seconds(1 * MIB)  # 0.06 s per block
    start = time.perf_counter()
    with BlockLoader(blocks, bandwidth=bandwidth) as loader:
        for i in range(4):
            loader.wait(i, timeout=10)
            loader.release(i)
    elapsed = time.perf_counter() - start
    assert 4 * modelled * 0.9 <= elapsed < 4 * modelled + 2.0
    for timing in loader.report().blocks:
        assert modelled * 0.9 <= timing.load_seconds < modelled + 1.0


def test_loader_never_runs_more_than_the_buffer_count_ahead():
    for buffers in (2, 3):
        with BlockLoader(make_blocks(6), buffers=buffers) as loader:
            first = loader.wait(0, timeout=5)
            assert wait_until(lambda: loader.outstanding() == buffers)
            time.sleep(0.1)  # plenty of time to run further ahead, if it could
            assert loader.outstanding() == buffers and loader.timings[buffers].load_start is None
            assert first  # block 0 is still held by "compute"
            for i in range(6):
                loader.wait(i, timeout=5)
                time.sleep(0.01)
                loader.release(i)
            timings = loader.report().blocks
            for k in range(buffers, 6):  # block k could only start once block k - buffers was released
                assert timings[k].load_start >= timings[k - buffers].released


def test_overlap_and_stall_accounting():
    bandwidth = BandwidthModel(bytes_per_second=10 * MIB)  # 0.05 s per 512 KiB block
    compute_bound = _run_pipeline(bandwidth, compute_s=0.1)
    load_bound = _run_pipeline(bandwidth, compute_s=0.0)
    assert compute_bound.overlap_ratio > 0.5  # only the first load is exposed
    assert load_bound.overlap_ratio < 0.5  # compute waits for almost every load
    assert load_bound.total_stall_s > compute_bound.total_stall_s


def _run_pipeline(bandwidth, compute_s: float, n: int = 5):
    with BlockLoader(make_blocks(n, nbytes=MIB // 2), bandwidth=bandwidth) as loader:
        for i in range(n):
            loader.wait(i, timeout=10)
            time.sleep(compute_s)
            loader.release(i)
    return loader.report()


def test_measured_pipeline_follows_the_planner_model():
    n, c_w, c_wo, load_s = 5, 0.03, 0.1, 0.12
    plan = plan_blocks(n, c_w, c_wo, load_s)
    assert plan.use_cache[0] is False and any(plan.use_cache)
    nbytes = MIB // 2
    blocks = [b if cached else None for b, cached in zip(make_blocks(n, nbytes), plan.use_cache)]
    start = time.perf_counter()
    with BlockLoader(blocks, plan.use_cache, bandwidth=BandwidthModel(nbytes / load_s)) as loader:
        for i, cached in enumerate(plan.use_cache):
            if cached:
                loader.wait(i, timeout=10)
                time.sleep(c_w)
                loader.release(i)
            else:
                time.sleep(c_wo)
    measured = time.perf_counter() - start
    predicted = simulate(plan.use_cache, c_w, c_wo, load_s, buffers=2).pipeline_latency
    assert predicted * 0.8 <= measured <= predicted * 1.5 + 0.2
    assert measured < n * (c_w + load_s)  # better than loading then computing each block in turn


def test_a_loader_error_surfaces_in_wait():
    blocks = make_blocks(4)

    def fetch(i):
        if i == 2:
            raise OSError("host cache shard unreadable")
        return blocks[i]

    with BlockLoader(fetch, [True] * 4) as loader:
        assert torch.equal(loader.wait(0, timeout=5)["kv.0.k"], blocks[0]["kv.0.k"])
        loader.wait(1, timeout=5)
        for i in (2, 3):  # the failed block and every block after it
            with pytest.raises(BlockLoadError, match="block 2 failed") as info:
                loader.wait(i, timeout=5)
            assert isinstance(info.value.__cause__, OSError)
        assert isinstance(loader.error, OSError)


def test_close_wakes_waiters_and_joins_the_thread():
    loader = BlockLoader(make_blocks(3, nbytes=MIB), bandwidth=BandwidthModel(bytes_per_second=MIB / 10))
    errors = []

    def consumer():
        try:
            loader.wait(0, timeout=10)
        except BlockLoadError as exc:
            errors.append(exc)

    thread = threading.Thread(target=consumer)
    thread.start()
    time.sleep(0.05)
    start = time.monotonic()
    loader.close()
    thread.join(5)
    assert time.monotonic() - start < 2 and not thread.is_alive()
    assert errors and "closed" in str(errors[0])
    assert not loader._thread.is_alive()


def test_wait_timeout():
    with BlockLoader(make_blocks(1, nbytes=MIB), bandwidth=BandwidthModel(bytes_per_second=MIB / 10)) as loader:
        with pytest.raises(TimeoutError, match="block 0"):
            loader.wait(0, timeout=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA side-stream path needs a GPU")
def test_cuda_side_stream_round_trip():
    blocks = make_blocks(3)
    with BlockLoader(blocks, device="cuda") as loader:
        for i in range(3):
            got = loader.wait(i, timeout=10)
            assert torch.equal(got[f"kv.{i}.k"].cpu(), blocks[i][f"kv.{i}.k"])
            loader.release(i)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA side-stream path needs a GPU")
def test_cuda_double_buffers_are_ordered_by_events_not_by_the_host():
    """Compute enqueues work that reads block i after the copy, then releases it; the copy of block i + 2 into
    the same buffer must wait for that work (an event), although the host returns from release at once."""
    n, size = 6, 4 * MIB
    blocks = [{f"kv.{i}.k": torch.full((size // 4,), float(i)).pin_memory()} for i in range(n)]
    sums = []
    with BlockLoader(blocks, device="cuda", buffers=2) as loader:
        for i in range(n):
            t = loader.wait(i, timeout=30)[f"kv.{i}.k"]
            for _ in range(20):  # long enough on the compute stream for a racing copy to show
                t = t * 1.0
            sums.append(t.sum())
            loader.release(i)
        pointers = {loader._slot_buffers[s][0].data_ptr() for s in range(2)}
    torch.cuda.synchronize()
    assert [s.item() for s in sums] == [float(i) * size // 4 for i in range(n)]
    assert len(pointers) == 2  # two device buffers served all six blocks
    assert loader.report().total_load_s > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA side-stream path needs a GPU")
def test_cuda_pageable_sources_are_pinned_for_the_copy():
    blocks = make_blocks(2)
    assert not blocks[0]["kv.0.k"].is_pinned()
    with BlockLoader(blocks, device="cuda") as loader:
        for i in range(2):
            got = loader.wait(i, timeout=10)
            assert got[f"kv.{i}.k"].is_cuda and torch.equal(got[f"kv.{i}.k"].cpu(), blocks[i][f"kv.{i}.k"])
            loader.release(i)
