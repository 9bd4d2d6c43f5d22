"""The engine under concurrency: pre-processing pools, registrations beside a busy loop, shared text encoders.

Every result must equal the same work done alone, one thing at a time. The thread switch interval is made
tiny so that interleavings that would corrupt shared state (stateful tokenizers, transformer taps) happen
within a few iterations rather than once a day in production.
"""
from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import torch

from instgenie.engine.editor import Editor
from instgenie.engine.request import EditRequest
from instgenie.engine.serving.loop import EngineLoop
from instgenie.engine.template_cache import DirectoryBlobStore, TemplateStore, step_shard
from tests.engine.helpers import masks_for, random_image

#: prompts of different lengths: the tokenizers switch padding/truncation between them
PROMPTS = ["a", "a red boat on a calm sea at dawn", "x" * 60, "two words", "", "a cat"]


@pytest.fixture()
def fast_switching():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def test_concurrent_text_encoding_never_returns_a_wrong_shape_or_value(tiny_model, fast_switching):
    text = tiny_model.text
    batches = [[p] for p in PROMPTS] + [["", p] for p in PROMPTS]
    expected = [text.encode(b) for b in batches]
    wrong: list[str] = []

    def work(offset: int) -> None:
        for j in range(30):
            k = (offset + j) % len(batches)
            try:
                got = text.encode(batches[k])
            except Exception as exc:  # noqa: BLE001 - an exception is a wrong answer too
                wrong.append(f"{batches[k]}: {type(exc).__name__}: {exc}")
                continue
            want = expected[k]
            if got.prompt_embeds.shape != want.prompt_embeds.shape or got.pooled.shape != want.pooled.shape:
                wrong.append(f"{batches[k]}: shape {tuple(got.prompt_embeds.shape)} != {tuple(want.prompt_embeds.shape)}")
            elif (got.prompt_embeds - want.prompt_embeds).abs().max() > 1e-6 or (got.pooled - want.pooled).abs().max() > 1e-6:
                wrong.append(f"{batches[k]}: values differ")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [], f"{len(wrong)} of 240 concurrent encodings were wrong, e.g. {wrong[:3]}"


def _requests(templates, res, count: int, tag: str) -> list[EditRequest]:
    masks = list(masks_for(res).values())
    return [EditRequest(templates[i % len(templates)], masks[i % len(masks)], PROMPTS[i % len(PROMPTS)], seed=i,
                        path=("sparse", "dense", "full")[i % 3], request_id=f"{tag}-{i}")
            for i in range(count)]


def _alone(editor, request: EditRequest):
    state = editor.start(request)
    while not state.done:
        assert editor.step([state]) == {}
    return editor.finish(state)


def _shards(editor, manifest):
    return [editor.store.step(manifest, i) for i in range(manifest.steps)]


def test_preprocessing_pool_and_registrations_beside_a_busy_loop_match_running_alone(
        tiny_model, tmp_path, fast_switching):
    res = tiny_model.info.resolution
    editor = Editor(tiny_model, TemplateStore(DirectoryBlobStore(tmp_path / "store")))
    alone_editor = Editor(tiny_model, TemplateStore(DirectoryBlobStore(tmp_path / "alone")))
    base = [editor.register_template(random_image(res, i), f"template {i}", steps=4, seed=i, mode=mode).template_id
            for i, mode in enumerate(("kv", "y"))]
    # Registrations that will run beside the loop, and what each gives when registered alone.
    jobs = [dict(image=random_image(res, 10 + i), prompt=PROMPTS[i], steps=4, seed=20 + i, mode=("kv", "y")[i % 2])
            for i in range(4)]
    reference = [alone_editor.register_template(**job) for job in jobs]
    new_ids = [m.template_id for m in reference]
    # Edits of the templates the loop already has, and of those registered during the run, each computed alone.
    requests = _requests(base + new_ids, res, 24, "alone")
    expected = {r.request_id.split("-")[1]: _alone(alone_editor if r.template_id in new_ids else editor, r)
                for r in requests}

    loop = EngineLoop(editor, max_batch_size=4, pre_workers=4, post_workers=2)
    registered = []
    try:
        def register_all():
            for job in jobs:
                registered.append(editor.register_template(**job))

        registrar = threading.Thread(target=register_all)
        registrar.start()
        checked = 0
        for rnd in range(6):  # many iterations: every round interleaves differently
            live = [r for r in _requests(base + new_ids, res, 24, f"r{rnd}") if r.template_id in base
                    or editor.has_template(r.template_id)]
            handles = [loop.submit(r) for r in live]
            for h in handles:
                got = h.result(timeout=120)
                want = expected[h.request_id.split("-")[1]]
                err = (got.latents - want.latents).abs().max().item()
                assert err <= 1e-6, f"{h.request_id} ({h.request.path}) differs from running alone by {err}"
                # latents agree to float rounding (concurrent kernels may split reductions differently); the
                # 8-bit image can then differ by one level where a value sits on a rounding boundary
                diff = np.abs(np.asarray(got.image).astype(int) - np.asarray(want.image)).max()
                assert diff <= 1, f"{h.request_id}: image differs by {diff} levels"
                checked += 1
        registrar.join(timeout=120)
        assert checked >= 6 * sum(r.template_id in base for r in requests)
    finally:
        loop.stop()
    # Registrations recorded beside the loop equal registrations alone (the loop's forwards never leaked in).
    assert [m.template_id for m in registered] == new_ids
    for got, want in zip(registered, reference):
        for step, (a, b) in enumerate(zip(_shards(editor, got), _shards(alone_editor, want))):
            assert a.keys() == b.keys()
            for name in a:
                assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), f"{got.template_id} {step_shard(step)} {name}"
    # And edits of them through the loop, now that they exist, match too.
    loop = EngineLoop(editor, max_batch_size=4, pre_workers=3)
    try:
        late = [r for r in _requests(base + new_ids, res, 24, "late") if r.template_id in new_ids]
        for h in [loop.submit(r) for r in late]:
            want = expected[h.request_id.split("-")[1]]
            assert (h.result(timeout=120).latents - want.latents).abs().max().item() <= 1e-6
    finally:
        loop.stop()


def test_concurrent_vae_encode_and_decode_equal_serial(tiny_model, fast_switching):
    """The VAE is shared by pre-processing (registration encodes) and post-processing (decodes): stateless."""
    codec = tiny_model.codec
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand((1, 3, *tiny_model.info.resolution), generator=gen) * 2 - 1 for _ in range(3)]
    encoded = [codec.encode(x) for x in images]
    decoded = [codec.decode(z) for z in encoded]
    wrong = []

    def work(k: int) -> None:
        for j in range(6):
            i = (k + j) % 3
            # within float rounding: concurrent kernels may split their reductions differently
            if (k + j) % 2:
                ok = torch.allclose(codec.decode(encoded[i]), decoded[i], rtol=0, atol=1e-6)
            else:
                ok = torch.allclose(codec.encode(images[i]), encoded[i], rtol=0, atol=1e-6)
            wrong.extend([] if ok else [(k, j)])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
