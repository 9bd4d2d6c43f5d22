"""AdaLN modulation rows: shared across calls by key, never stale, bounded, and keyed exactly per request."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from instgenie.engine.step import cond_digest
from instgenie.engine.transformer.modulation import ModulationCache, modulation_cache
from instgenie.engine.transformer.sparse import sparse_forward
from instgenie.engine.transformer.synthetic import synthetic_step


@pytest.fixture(scope="module")
def step(small_model):
    return synthetic_step(small_model, 3, 0.2, "kv", seed=11)


def test_shared_rows_give_the_same_output_and_are_reused(small_model, step):
    tr = small_model.transformer
    cache = modulation_cache(tr)
    fresh = sparse_forward(tr, step.packed())
    hits, misses = cache.hits, cache.misses
    first = sparse_forward(tr, step.packed(shared_modulation=True))
    again = sparse_forward(tr, step.packed(shared_modulation=True))
    assert (cache.misses - misses, cache.hits - hits) == (3, 3)  # three sequences computed once, then reused
    assert torch.equal(first, fresh) and torch.equal(again, fresh)


def test_rows_hold_one_plus_scale_and_match_the_blocks_own_linears(small_model):
    tr = small_model.transformer
    cache = ModulationCache(tr)
    temb = torch.randn(2, tr.inner_dim)
    rows = cache.compute(temb)
    assert rows.shape == (2, cache.offsets[-1])
    emb = tr.transformer_blocks[0].norm1.linear(torch.nn.functional.silu(temb))
    shift, scale, gate = emb.chunk(6, dim=1)[:3]
    c = tr.inner_dim
    assert torch.equal(rows[:, :c], shift) and torch.equal(rows[:, c:2 * c], 1 + scale)
    assert torch.equal(rows[:, 2 * c:3 * c], gate)
    last = tr.norm_out.linear(torch.nn.functional.silu(temb))
    assert torch.equal(rows[:, -2 * c:-c], 1 + last[:, :c]) and torch.equal(rows[:, -c:], last[:, c:])


def test_a_modified_weight_invalidates_the_rows(small_model):
    tr = small_model.transformer
    cache = ModulationCache(tr)
    temb = torch.randn(1, tr.inner_dim)
    before = cache.rows(lambda rows: temb, ["k"])
    weight = tr.single_transformer_blocks[0].norm.linear.weight
    with torch.no_grad():
        weight.mul_(2)
    try:
        after = cache.rows(lambda rows: temb, ["k"])
        assert cache.misses == 2 and not torch.equal(before, after)
    finally:
        with torch.no_grad():
            weight.div_(2)


def test_lru_is_bounded_by_bytes_and_mixes_hits_with_misses(small_model):
    tr = small_model.transformer
    temb = {k: torch.randn(1, tr.inner_dim, generator=torch.Generator().manual_seed(i)) for i, k in enumerate("abc")}
    probe = ModulationCache(tr)
    row_bytes = probe.compute(temb["a"]).nbytes
    cache = ModulationCache(tr, budget_bytes=2 * row_bytes)
    for k in "abc":
        cache.rows(lambda rows, k=k: temb[k], [k])
    assert len(cache) == 2  # "a", the least recently used, went
    asked = []
    rows = cache.rows(lambda rows: (asked.append(rows), torch.cat([temb[k] for k in "ba"])[rows])[1], ["b", "a"])
    assert asked == [[1]]  # only "a" was computed
    expected = probe.compute(torch.cat([temb["b"], temb["a"]]))
    assert (rows - expected).abs().max().item() < 1e-6


def test_a_miss_computes_the_next_steps_rows_in_the_same_pass(small_model):
    tr = small_model.transformer
    cache = ModulationCache(tr)
    temb = torch.randn(4, tr.inner_dim, generator=torch.Generator().manual_seed(3))  # steps 0..3 of one request
    asked = []

    def ahead_temb(s, count):
        asked.append((s, count))
        return temb[1:1 + count]

    first = cache.rows(lambda rows: temb[:1], [("p", 0)], [[("p", 1), ("p", 2), ("p", 3)]], ahead_temb)
    assert asked == [(0, 3)] and (cache.misses, len(cache)) == (1, 4)
    for step in (1, 2, 3):  # every later step is a hit, and its row is the one its own temb gives
        row = cache.rows(lambda rows: pytest.fail("a look-ahead row was computed again"), [("p", step)])
        assert (row - cache.compute(temb[step:step + 1])).abs().max().item() < 1e-6
    assert (cache.hits, cache.misses) == (3, 1)
    assert (first - cache.compute(temb[:1])).abs().max().item() < 1e-6


def test_look_ahead_is_bounded_by_the_budget_and_the_cap(small_model, monkeypatch):
    from instgenie.engine.transformer import modulation

    tr = small_model.transformer
    row_bytes = ModulationCache(tr).compute(torch.randn(1, tr.inner_dim)).nbytes
    cache = ModulationCache(tr, budget_bytes=2 * 3 * row_bytes)  # half of it: three rows per sequence
    assert cache.ahead_count(50, 1, row_bytes) == 2 and cache.ahead_count(50, 3, row_bytes) == 0
    assert cache.ahead_count(1, 1, row_bytes) == 1  # never more than the steps left
    monkeypatch.setattr(modulation, "AHEAD_STEPS", 1)
    assert ModulationCache(tr).ahead_count(50, 1, row_bytes) == 1


def _counting(cache):
    """Wrap cache.compute to count the rows it computes."""
    computed = []
    compute = cache.compute
    cache.compute = lambda temb: (computed.append(temb.shape[0]), compute(temb))[1]
    return computed


def test_look_ahead_skips_cached_and_shared_keys_and_keeps_the_next_step_last(small_model):
    tr = small_model.transformer
    cache = ModulationCache(tr)
    temb = torch.randn(5, tr.inner_dim, generator=torch.Generator().manual_seed(4))
    cache.rows(lambda rows: temb[2:3], [("p", 2)])  # step 2 is already there (another request, same prompt)
    computed, asked = _counting(cache), []

    def ahead_temb(s, count):
        asked.append((s, count))
        return temb[1:1 + count]

    ahead = [("p", 1), ("p", 2), ("p", 3)]
    cache.rows(lambda rows: temb[:1].expand(len(rows), -1), [("p", 0), ("p", 0)], [ahead, ahead], ahead_temb)
    assert asked == [(0, 3)]  # the second sequence shares the first one's keys: planned once
    assert computed == [2 + 2]  # two current rows, steps 1 and 3 (step 2 was cached)
    assert list(cache._rows)[-1][1] == ("p", 1)  # the nearest step is the most recently used row


def test_look_ahead_backs_off_when_the_running_batch_outgrows_the_budget(small_model):
    """Requests with distinct prompts arriving one per step, each running 28 steps, every running request in
    each call (the engine packs them all), a budget of 64 rows: look-ahead must shrink as the batch grows
    rather than evict rows before their step and compute them again (the first version, which sized it by the
    missing sequences alone, computed 363 rows here for 224 without look-ahead)."""
    tr = small_model.transformer
    row_bytes = ModulationCache(tr).compute(torch.randn(1, tr.inner_dim)).nbytes
    steps = 28
    temb = torch.randn(8, steps, tr.inner_dim, generator=torch.Generator().manual_seed(6))
    for requests in (8, 1):
        cache = ModulationCache(tr, budget_bytes=64 * row_bytes)
        computed = _counting(cache)
        for tick in range(requests + steps - 1):
            running = [(r, tick - r) for r in range(requests) if 0 <= tick - r < steps]
            keys = [(r, step) for r, step in running]
            ahead = [[(r, j) for j in range(step + 1, steps)] for r, step in running]
            cache.rows(lambda rows, running=running: torch.stack([temb[running[i]] for i in rows]), keys, ahead,
                       lambda s, count, running=running: temb[running[s][0], running[s][1] + 1:][:count])
        plain = requests * steps  # rows (and misses) without look-ahead
        assert sum(computed) <= 1.15 * plain, (requests, sum(computed))
        assert cache.misses <= (plain / 4 if requests > 1 else 1), (requests, cache.misses)


def test_sparse_forward_serves_the_next_step_from_rows_computed_ahead(small_model, step):
    tr = small_model.transformer
    cache = modulation_cache(tr)
    cache.clear()
    packed = step.packed()
    n = step.index.__len__()
    schedule = torch.tensor([500.0, 400.0, 300.0])  # the synthetic step is at t = 500; two more steps follow
    packed.cond_keys = [("ahead", s, 0) for s in range(n)]
    packed.cond_ahead = [([("ahead", s, 1), ("ahead", s, 2)], schedule[1:]) for s in range(n)]
    sparse_forward(tr, packed)
    misses = cache.misses
    later = step.packed()
    later.timestep = torch.full((n,), 0.4)
    expected = sparse_forward(tr, later)  # no keys: rows computed in this call
    later.cond_keys = [("ahead", s, 1) for s in range(n)]
    got = sparse_forward(tr, later)
    assert cache.misses == misses  # every sequence's step-1 rows were there
    assert (got - expected).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="cond_ahead"):
        later.cond_ahead = packed.cond_ahead[:1]
        sparse_forward(tr, later)


def test_cond_keys_must_match_the_sequences(small_model, step):
    packed = step.packed()
    packed.cond_keys = ["only one"]
    with pytest.raises(ValueError, match="cond_keys"):
        sparse_forward(small_model.transformer, packed)


def _state(pooled, timesteps, guidance=None):
    text = SimpleNamespace(pooled=pooled, prompt_embeds=torch.zeros(pooled.shape[0], 1, 1))
    return SimpleNamespace(text=text, timesteps=timesteps, guidance=guidance, cond_digest=None,
                           branches=pooled.shape[0])


def test_request_digest_follows_prompt_schedule_and_guidance():
    pooled = torch.randn(2, 8)
    steps = torch.linspace(1000, 100, 4)
    base = cond_digest(_state(pooled, steps, torch.tensor([3.5])))
    assert len(base) == 2 and base[0] != base[1]  # branches differ (unconditional / conditional prompt)
    assert cond_digest(_state(pooled.clone(), steps.clone(), torch.tensor([3.5]))) == base
    assert cond_digest(_state(pooled + 1e-3, steps, torch.tensor([3.5])))[0] != base[0]
    assert cond_digest(_state(pooled, torch.linspace(1000, 100, 5), torch.tensor([3.5])))[0] != base[0]
    assert cond_digest(_state(pooled, steps, torch.tensor([4.0])))[0] != base[0]
    assert cond_digest(_state(pooled, steps))[0] != base[0]


def test_an_edit_computes_its_rows_once_and_every_later_step_hits(tiny_editor):
    """The engine passes each request's remaining schedule: one miss per guidance branch, at the first step."""
    from tests.engine.helpers import masks_for, random_image

    res = tiny_editor.model.info.resolution
    manifest = tiny_editor.register_template(random_image(res), "a red cat", mode="kv", seed=11)
    cache = modulation_cache(tiny_editor.model.transformer)
    hits, misses = cache.hits, cache.misses
    tiny_editor.edit(manifest.template_id, masks_for(res)["unaligned"], "a prompt seen once", seed=4)
    new_misses, new_hits = cache.misses - misses, cache.hits - hits
    steps = tiny_editor.model.info.default_steps
    assert steps >= 3 and 1 <= new_misses <= 2  # one miss per guidance branch
    assert new_hits + new_misses == steps * new_misses  # every later step of every branch hits
