"""AdaLN modulation of every block, computed once per (prompt, timestep) and kept in a small LRU on the model.

Every Flux block turns the conditioning vector temb (timestep + guidance + pooled prompt) into its shift /
scale / gate rows with a `[1, hidden] x [hidden, k*hidden]` linear. That reads the whole weight for one row:
memory-bound, and the same whether 10 % or 100 % of the tokens are computed, so with small masks it is a
large share of a step (docs/results/engine.md). The rows depend only on temb, so every request at the same
step of the same schedule with the same prompt (the same template's prompt, a popular prompt) shares them.

Layout: one flat row per sequence holding every block's chunks one after another, so a packed batch gathers
its rows with one `cat` and each block slices a view. Scale chunks are stored as `1 + scale`, which is what
the forward multiplies by; the dense forward computes the same `1 + scale`, so results are unchanged bit for
bit. Rows are keyed by a caller-given key per sequence (see `PackedStep.cond_keys`) together with a stamp of
the modulation weights, so a replaced or modified weight never serves a stale row.

Look-ahead: a request's schedule fixes its conditioning at every later step too, so on a miss the rows of its
next steps (`PackedStep.cond_ahead`) are computed in the same GEMMs, reading each weight once for up to
`AHEAD_STEPS` + 1 rows instead of once per step. How far ahead is bounded by the budget (`ahead_count`): the
batch's sequences must fit their rows in half of it. With the default 256 MB: 63 steps for flux-wide (78 KB
rows) at any batch up to 26 sequences; for FLUX.1 in bf16 (2.1 MB rows) 62 / 30 / 14 / 6 steps at 1 / 2 / 4 / 8
sequences. A lone request (no other request sharing its prompt) then computes its rows once per that many
steps instead of at every step. Rows computed in a larger GEMM may round differently in the last bit from a
one-row GEMM; they are the same linear of the same temb.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F

#: default byte budget of one transformer's modulation LRU (FLUX.1 in bf16: about 2.1 MB per prompt and step)
DEFAULT_BUDGET_BYTES = 256 * 1024 * 1024
#: on a miss, rows of at most this many next steps of the sequence are computed with it (see module docstring)
AHEAD_STEPS = 63


def _layout(tr) -> list[tuple[torch.nn.Linear, int, tuple[int, ...]]]:
    """(linear, number of chunks, positions of the scale chunks) per modulation, in forward order.

    Dual blocks: image AdaLayerNormZero then text AdaLayerNormZero, (shift, scale, gate) x (attention, MLP).
    Single blocks: AdaLayerNormZeroSingle, (shift, scale, gate). Last: AdaLayerNormContinuous, (scale, shift).
    """
    out = []
    for blk in tr.transformer_blocks:
        out.append((blk.norm1.linear, 6, (1, 4)))
        out.append((blk.norm1_context.linear, 6, (1, 4)))
    for blk in tr.single_transformer_blocks:
        out.append((blk.norm.linear, 3, (1,)))
    out.append((tr.norm_out.linear, 2, (0,)))
    return out


class ModulationCache:
    """Per-sequence modulation rows of one transformer, an LRU bounded by bytes."""

    def __init__(self, transformer, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.layout = _layout(transformer)
        self.offsets = [0]
        for linear, _, _ in self.layout:
            self.offsets.append(self.offsets[-1] + linear.out_features)
        self.budget_bytes = budget_bytes
        self._rows: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def stamp(self) -> tuple:
        """Identity and version of every modulation weight: a change of either invalidates every row."""
        return tuple((lin.weight.data_ptr(), lin.weight._version, lin.bias.data_ptr(), lin.bias._version)
                     for lin, _, _ in self.layout)

    def compute(self, temb: torch.Tensor) -> torch.Tensor:
        """Rows for temb (S, hidden): (S, total) with `1 + scale` in place of every scale chunk."""
        act = F.silu(temb)
        parts = []
        for linear, chunks, scales in self.layout:
            emb = linear(act.to(linear.weight.dtype))
            width = emb.shape[1] // chunks
            for c in scales:
                emb[:, c * width:(c + 1) * width] += 1
            parts.append(emb)
        return torch.cat(parts, dim=1)

    def ahead_count(self, wanted: int, sequences: int, row_bytes: int) -> int:
        """How many next-step rows to compute with a missing sequence of a call over `sequences` sequences: at
        most `AHEAD_STEPS`, and few enough that every sequence of the batch (the engine packs every running
        request into each call) could hold its current and look-ahead rows in half the budget, so look-ahead
        rows of concurrent requests do not push each other out before their step."""
        fit = self.budget_bytes // (2 * max(1, sequences) * max(1, row_bytes)) - 1
        return max(0, min(wanted, AHEAD_STEPS, fit))

    def rows(self, temb_fn, keys: Sequence[Hashable] | None,
             ahead: Sequence[Sequence[Hashable]] | None = None,
             ahead_temb: Callable[[int, int], torch.Tensor] | None = None) -> torch.Tensor:
        """(S, total) rows; `temb_fn(positions)` gives temb of the listed sequences for the ones not cached.

        ahead: per sequence, the keys of its next steps; `ahead_temb(sequence, count)` the temb (count, hidden)
        of its first `count` next steps. A missing sequence's next rows are computed with it, except those
        already cached or already planned in this call (see the module docstring).
        """
        if keys is None:
            return self.compute(temb_fn(None))
        stamp = self.stamp()
        full = [(stamp, k) for k in keys]
        with self._lock:
            found = [self._rows.get(k) for k in full]
            for k, r in zip(full, found):
                if r is not None:
                    self._rows.move_to_end(k)
            missing = [i for i, r in enumerate(found) if r is None]
            plan = self._plan_ahead(full, missing, ahead, stamp) if ahead is not None and ahead_temb else []
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            parts = [temb_fn(missing)]
            later: list[tuple[Hashable, int]] = []  # (full key, row in `fresh`), nearest step first
            for i, count, picks in plan:
                parts.append(ahead_temb(i, count)[picks])
                start = len(missing) + len(later)
                later += [((stamp, ahead[i][p]), start + j) for j, p in enumerate(picks)]
            fresh = self.compute(torch.cat(parts) if len(parts) > 1 else parts[0])
            with self._lock:
                for j, i in enumerate(missing):
                    # with look-ahead rows each kept row gets its own storage: a view would pin all of `fresh`
                    row = fresh[j:j + 1].clone() if later else fresh[j:j + 1]
                    found[i] = row
                    if full[i] not in self._rows:
                        self._rows[full[i]] = row
                        self._bytes += row.nbytes
                # farthest step first: the next step's row ends up the most recently used, the last evicted
                for key, j in reversed(later):
                    if key not in self._rows:
                        row = fresh[j:j + 1].clone()
                        self._rows[key] = row
                        self._bytes += row.nbytes
                while self._bytes > self.budget_bytes and self._rows:
                    _, old = self._rows.popitem(last=False)
                    self._bytes -= old.nbytes
        return found[0] if len(found) == 1 else torch.cat(found)

    def _plan_ahead(self, full, missing, ahead, stamp) -> list[tuple[int, int, list[int]]]:
        """(sequence, count, positions among its next `count` steps to compute) per missing sequence: each key
        once per call (two sequences with one prompt share), none already cached. Called under the lock."""
        row_bytes = self.offsets[-1] * self.layout[0][0].weight.element_size()
        planned = {full[i] for i in missing}
        plan = []
        for i in missing:
            count = self.ahead_count(len(ahead[i]), len(full), row_bytes)
            picks = []
            for p, key in enumerate(ahead[i][:count]):
                key = (stamp, key)
                if key not in self._rows and key not in planned:
                    planned.add(key)
                    picks.append(p)
            if picks:
                plan.append((i, picks[-1] + 1, picks))
        return plan

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._rows)


def modulation_cache(transformer) -> ModulationCache:
    """The transformer's own cache, created on first use (kept in its __dict__, never in its state_dict)."""
    cache = transformer.__dict__.get("_instgenie_modulation")
    if cache is None:
        cache = transformer.__dict__.setdefault("_instgenie_modulation", ModulationCache(transformer))
    return cache


class Modulation:
    """Per-block views into the rows of one packed batch."""

    def __init__(self, cache: ModulationCache, rows: torch.Tensor):
        self.rows = rows
        self._views = [rows[:, a:b] for a, b in zip(cache.offsets, cache.offsets[1:])]

    def dual(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and text rows of dual block j, each (S, 6 * hidden)."""
        return self._views[2 * j], self._views[2 * j + 1]

    def single(self, num_dual: int, j: int) -> torch.Tensor:
        return self._views[2 * num_dual + j]

    def final(self) -> torch.Tensor:
        """(S, 2 * hidden): 1 + scale, then shift."""
        return self._views[-1]
