"""Per-block cache loader overlapped with compute: a CUDA side stream, or on CPU a thread with a bandwidth model.

The loader moves each block's cached tensors (host -> device buffers) in block order, skipping blocks the
planner computes in full. Compute waits only for the block it needs (`wait(i)`), and gives the buffer back
when it is done with it (`release(i)`; waiting for a later block also releases earlier ones). At most
`buffers` loaded blocks are held at once (2 = double buffering), so the loader never runs further ahead.

On CUDA the copies are non-blocking from pinned memory on a side stream; a CUDA event per block orders
the compute stream after its copy, and an event recorded on release orders a buffer's reuse after the
compute that read it. On CPU (this machine) the "device" is host memory: the copy is real and the thread
then sleeps for whatever remains of `BandwidthModel.seconds(nbytes)`, so timing logic is testable.

Tensors returned by `wait(i)` live in a reused buffer: they are valid until `release(i)`.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import InstGenIEError

BlockTensors = Mapping[str, torch.Tensor]


class BlockLoadError(InstGenIEError):
    """Loading a block's cache failed (or the loader was closed); raised to the compute side by `wait`."""


@dataclass(frozen=True)
class BandwidthModel:
    """Transfer time of one block: `latency_s + nbytes / bytes_per_second`."""

    bytes_per_second: float
    latency_s: float = 0.0

    def __post_init__(self):
        if self.bytes_per_second <= 0 or self.latency_s < 0:
            raise ValueError(f"invalid bandwidth model {self}")

    def seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bytes_per_second


@dataclass
class BlockTiming:
    """Host timestamps of one block, in seconds since the loader started (None: did not happen)."""

    index: int
    skipped: bool = False  # computed in full: nothing loaded
    nbytes: int = 0
    load_start: float | None = None
    load_end: float | None = None
    wait_start: float | None = None
    wait_end: float | None = None
    released: float | None = None

    @property
    def load_seconds(self) -> float:
        return 0.0 if self.load_start is None or self.load_end is None else self.load_end - self.load_start

    @property
    def stall_seconds(self) -> float:
        """How long compute sat idle waiting for this block's load."""
        return 0.0 if self.wait_start is None or self.wait_end is None else max(0.0, self.wait_end - self.wait_start)


@dataclass(frozen=True)
class LoaderReport:
    blocks: list[BlockTiming]
    total_load_s: float
    total_stall_s: float

    @property
    def overlap_ratio(self) -> float:
        """Fraction of load time hidden behind compute (1.0 = compute never waited)."""
        if self.total_load_s <= 0:
            return 1.0
        return min(1.0, max(0.0, 1.0 - self.total_stall_s / self.total_load_s))


def blocks_from_shard(shard: Mapping[str, torch.Tensor], n_blocks: int) -> list[dict[str, torch.Tensor]]:
    """Split a step shard (`kv.<b>.k`, `kv.<b>.v`, `y.<b>`: the block is the second name part) per block."""
    blocks: list[dict[str, torch.Tensor]] = [{} for _ in range(n_blocks)]
    for name, tensor in shard.items():
        parts = name.split(".")
        if len(parts) >= 2 and parts[1].isdigit() and int(parts[1]) < n_blocks:
            blocks[int(parts[1])][name] = tensor
    return blocks


class BlockLoader:
    """Loads `blocks[i]` for every i with `use_cache[i]`, in order, at most `buffers` ahead of compute.

    `blocks` is a sequence (None for blocks computed in full) or a callable `fetch(i) -> tensors`, called
    on the loader thread (then `use_cache` gives the block count). Errors of `fetch` or of the copy
    surface in `wait` as BlockLoadError, chained to the original exception.
    """

    def __init__(self, blocks: Sequence[BlockTensors | None] | Callable[[int], BlockTensors],
                 use_cache: Sequence[bool] | None = None, *, device: str | torch.device = "cpu",
                 bandwidth: BandwidthModel | None = None, buffers: int = 2, autostart: bool = True,
                 name: str = "block-loader", copy_on_cpu: bool = True):
        if callable(blocks):
            if use_cache is None:
                raise ValueError("with a fetch callable, pass use_cache to give the number of blocks")
            self._fetch = blocks
        else:
            use_cache = [b is not None for b in blocks] if use_cache is None else use_cache
            if len(use_cache) != len(blocks):
                raise ValueError(f"use_cache has {len(use_cache)} entries for {len(blocks)} blocks")
            missing = [i for i, (b, c) in enumerate(zip(blocks, use_cache)) if c and b is None]
            if missing:
                raise ValueError(f"blocks {missing} are marked use_cache but have no tensors")
            self._fetch = blocks.__getitem__
        if buffers < 1:
            raise ValueError(f"buffers must be >= 1, got {buffers}")
        self.use_cache = [bool(c) for c in use_cache]
        self.n_blocks = len(self.use_cache)
        self.device = torch.device(device)
        self.bandwidth, self.buffers, self.name = bandwidth, buffers, name
        # On a CPU device the host tier already is device memory: without the copy, the loader models a DMA
        # engine (the transfer costs link time, not compute time), as on a GPU.
        self.copy_on_cpu = copy_on_cpu
        self._cuda = self.device.type == "cuda" and torch.cuda.is_available()
        if self.device.type == "cuda" and not self._cuda:
            raise ValueError("a CUDA device was requested but CUDA is not available")

        self._cond = threading.Condition()
        self._ready = [threading.Event() for _ in range(self.n_blocks)]
        self._loaded: dict[int, dict[str, torch.Tensor]] = {}  # loaded, not yet released
        self._slot_of: dict[int, int] = {}
        self._free_slots = deque(range(buffers))
        # Per slot, buffers by position in the block: block i's "kv.i.k" reuses block i-2's "kv.(i-2).k".
        self._slot_buffers: list[list[torch.Tensor]] = [[] for _ in range(buffers)]
        self._released = [False] * self.n_blocks
        self._consumer_pos = 0  # lowest block compute may still ask for
        self._error: tuple[int, BaseException] | None = None
        self._closed = False
        self._stop = threading.Event()
        self.timings = [BlockTiming(i, skipped=not c) for i, c in enumerate(self.use_cache)]
        if self._cuda:
            self._stream = torch.cuda.Stream(self.device)
            self._copy_done: dict[int, torch.cuda.Event] = {}
            self._slot_free: list[torch.cuda.Event | None] = [None] * buffers
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False
        if autostart:
            self.start()

    def _now(self) -> float:
        return time.perf_counter() - self._t0

    # -- compute side ---------------------------------------------------------------------------------
    def start(self) -> "BlockLoader":
        if not self._started:
            self._started = True
            self._t0 = time.perf_counter()
            self._thread.start()
        return self

    def wait(self, index: int, timeout: float | None = None) -> dict[str, torch.Tensor]:
        """Block `index`'s device tensors, waiting only for that block's load; releases earlier blocks."""
        if not self.use_cache[index]:
            raise ValueError(f"block {index} is computed in full (planner): nothing is loaded for it")
        if not self._started:
            raise RuntimeError(f"{self.name} was not started")
        timing = self.timings[index]
        if timing.wait_start is None:
            timing.wait_start = self._now()
        self._release_before(index)
        if not self._ready[index].wait(timeout):
            raise TimeoutError(f"{self.name}: block {index} not loaded within {timeout}s")
        with self._cond:
            tensors = self._loaded.get(index)
            if tensors is None:
                self._raise_unavailable(index)
            if timing.wait_end is None:
                timing.wait_end = self._now()
            if self._cuda:  # the compute stream (not the host) waits for the copy
                torch.cuda.current_stream(self.device).wait_event(self._copy_done[index])
            return tensors

    def release(self, index: int) -> None:
        """Compute is done with block `index`: its buffer may be refilled. Idempotent."""
        with self._cond:
            self._release_locked(index)

    def _release_before(self, index: int) -> None:
        with self._cond:
            self._consumer_pos = max(self._consumer_pos, index)
            for earlier in [i for i in self._loaded if i < index]:
                self._release_locked(earlier)

    def _release_locked(self, index: int) -> None:
        if self._released[index] or index not in self._loaded:
            return
        self._released[index] = True
        self.timings[index].released = self._now()
        del self._loaded[index]
        slot = self._slot_of.pop(index)
        if self._cuda:  # the next copy into this slot must wait for the compute that reads it now
            self._slot_free[slot] = torch.cuda.current_stream(self.device).record_event()
        self._free_slots.append(slot)
        self._cond.notify_all()

    def _raise_unavailable(self, index: int):
        if self._released[index]:
            raise BlockLoadError(f"{self.name}: block {index} was already released; its buffer has been reused")
        if self._error is not None:
            failed, exc = self._error
            raise BlockLoadError(f"{self.name}: loading block {failed} failed: {exc!r}") from exc
        raise BlockLoadError(f"{self.name}: closed before block {index} was loaded")

    # -- loader thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        for index in (i for i, cached in enumerate(self.use_cache) if cached):
            with self._cond:
                while not self._free_slots and not self._closed:
                    self._cond.wait()
                if self._closed:
                    break
                slot = self._free_slots.popleft()
            timing = self.timings[index]
            timing.load_start = self._now()
            try:
                host = self._fetch(index)
                tensors, nbytes = self._transfer(index, host, slot)
                timing.nbytes = nbytes
                if self.bandwidth is not None:
                    remaining = self.bandwidth.seconds(nbytes) - (self._now() - timing.load_start)
                    if remaining > 0 and self._stop.wait(remaining):
                        break  # closed while "transferring"
            except BaseException as exc:  # surfaced to compute in wait(); the thread must not die silently
                with self._cond:
                    self._error = (index, exc)
                    self._free_slots.append(slot)
                break
            with self._cond:
                timing.load_end = self._now()
                self._loaded[index], self._slot_of[index] = tensors, slot
                if index < self._consumer_pos:  # compute already moved past it: nobody will wait for it
                    self._release_locked(index)
                self._ready[index].set()
        self._wake_all_waiters()

    def _transfer(self, index: int, host: BlockTensors, slot: int) -> tuple[dict[str, torch.Tensor], int]:
        """Copy `host` into the slot's device buffers (reused when shapes match); returns (tensors, bytes)."""
        buffers = self._slot_buffers[slot]
        out, nbytes = {}, 0
        if self._cuda:
            with torch.cuda.stream(self._stream):
                if self._slot_free[slot] is not None:
                    self._stream.wait_event(self._slot_free[slot])
                for position, (name, src) in enumerate(host.items()):
                    src = src if src.is_pinned() else src.pin_memory()  # non_blocking needs page-locked memory
                    out[name] = self._buffer(buffers, position, src)
                    out[name].copy_(src, non_blocking=True)
                    nbytes += src.nbytes
                done = torch.cuda.Event()
                done.record(self._stream)
            self._copy_done[index] = done
            done.synchronize()  # only this thread waits; gives load_end the real completion time
        elif not self.copy_on_cpu:
            out = dict(host)
            nbytes = sum(t.nbytes for t in host.values())
        else:
            for position, (name, src) in enumerate(host.items()):
                out[name] = self._buffer(buffers, position, src)
                out[name].copy_(src)
                nbytes += src.nbytes
        return out, nbytes

    def _buffer(self, buffers: list[torch.Tensor], position: int, like: torch.Tensor) -> torch.Tensor:
        if position < len(buffers):
            buf = buffers[position]
            if buf.shape == like.shape and buf.dtype == like.dtype:
                return buf
        buf = torch.empty(like.shape, dtype=like.dtype, device=self.device)
        if position < len(buffers):
            buffers[position] = buf
        else:
            buffers.append(buf)
        return buf

    def _wake_all_waiters(self) -> None:
        # Blocks that will never load (error or close) must not leave wait() hanging.
        for event in self._ready:
            event.set()

    # -- lifecycle and reporting ----------------------------------------------------------------------
    def close(self, timeout: float | None = 10.0) -> None:
        """Stop loading, wake every waiter, join the thread. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._stop.set()
        if self._started:
            self._thread.join(timeout)
        self._wake_all_waiters()

    def __enter__(self) -> "BlockLoader":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def error(self) -> BaseException | None:
        return None if self._error is None else self._error[1]

    def outstanding(self) -> int:
        """Blocks loaded and not yet released (never more than `buffers`)."""
        with self._cond:
            return len(self._loaded)

    def report(self) -> LoaderReport:
        loaded = [t for t in self.timings if not t.skipped]
        return LoaderReport(blocks=list(self.timings), total_load_s=sum(t.load_seconds for t in loaded),
                            total_stall_s=sum(t.stall_seconds for t in loaded))
