"""Streaming caches block by block (and the planner's recompute choice) keeps edits exact."""
from __future__ import annotations

import pytest

from instgenie.engine.pipeline import BandwidthModel, BlockCosts, PipelineConfig, plan_step
from tests.engine.helpers import masks_for, random_image


@pytest.mark.parametrize("mode", ["kv", "y"])
def test_streamed_cache_gives_the_same_edit_as_resident(tiny_editor, mode):
    res = tiny_editor.model.info.resolution
    tpl = tiny_editor.register_template(random_image(res, 3), "a", mode=mode, steps=3)
    mask = masks_for(res)["unaligned"]
    resident = tiny_editor.edit(tpl.template_id, mask, "b", seed=2)
    tiny_editor.pipeline = PipelineConfig(bandwidth=BandwidthModel(50e6), planner=False, buffers=2)
    streamed = tiny_editor.edit(tpl.template_id, mask, "b", seed=2)
    assert (streamed.latents - resident.latents).abs().max().item() == 0.0
    reports = tiny_editor.pipeline.reports
    assert len(reports) == 3 and all(not t.skipped and t.nbytes > 0 for t in reports[-1].blocks)


def test_planner_recomputes_leading_blocks_on_a_slow_link_and_matches_its_reference(tiny_editor):
    res = tiny_editor.model.info.resolution
    tpl = tiny_editor.register_template(random_image(res, 4), "a", mode="y", steps=3)
    mask = masks_for(res)["disc"]
    n = tiny_editor.model.num_blocks
    # Compute with cache is cheap, full compute moderate, the link slow: the plan recomputes a prefix.
    costs = BlockCosts(a_cached=0.0, b_cached=0.001, a_full=0.0, b_full=0.005)
    tiny_editor.pipeline = PipelineConfig(bandwidth=BandwidthModel(1e9, latency_s=0.006), costs=costs)
    planned = tiny_editor.edit(tpl.template_id, mask, "b", seed=2)
    plan = tiny_editor.pipeline.plans[-1]
    assert plan.use_cache[0] is False and any(plan.use_cache)  # Algorithm 1 here: [full, cache, full]
    assert all(t.skipped == (not c) for t, c in zip(tiny_editor.pipeline.reports[-1].blocks, plan.use_cache))
    # The dense oracle with the same per-block choice gives the same edit.
    tiny_editor.pipeline = None
    state = tiny_editor.start(__import__("instgenie.engine.request", fromlist=["EditRequest"]).EditRequest(
        tpl.template_id, mask, "b", seed=2, path="dense"))
    while not state.done:
        tiny_editor.step([state], use_cache=plan.use_cache)
    assert (state.latents - planned.latents).abs().max().item() < 1e-5
    assert len(plan.use_cache) == n


def test_plan_only_in_y_mode_with_costs_and_a_link():
    costs = BlockCosts(0.0, 0.001, 0.0, 0.01)
    shard = {"y.0": __import__("torch").zeros(4)}
    cfg = PipelineConfig(bandwidth=BandwidthModel(1e6), costs=costs)
    assert plan_step(cfg, "kv", [shard], 1, 1, 4) is None
    assert plan_step(PipelineConfig(costs=costs), "y", [shard], 1, 1, 4) is None
    assert plan_step(cfg, "y", [shard], 1, 1, 4) is not None


def test_calibrated_costs_are_positive(tiny_model):
    costs = BlockCosts.calibrate(tiny_model, repeats=1)
    assert costs.full(64) > 0 and costs.with_cache(8) > 0


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["kv", "y"])
def test_cuda_streamed_cache_gives_the_same_edit_as_resident(model_root, tmp_path, mode):
    """On the GPU: shards in host memory, copied block by block on a side stream while blocks compute."""
    from instgenie.engine.editor import Editor
    from instgenie.engine.models.loader import preset_model
    from instgenie.engine.template_cache import DirectoryBlobStore, TemplateStore

    model = preset_model("flux-tiny", root=model_root, device="cuda")
    editor = Editor(model, TemplateStore(DirectoryBlobStore(tmp_path / "store")))
    res = model.info.resolution
    tpl = editor.register_template(random_image(res, 5), "a", mode=mode, steps=3)
    mask = masks_for(res)["disc"]
    resident = editor.edit(tpl.template_id, mask, "b", seed=2)
    editor.pipeline = PipelineConfig(device="cuda", planner=False, buffers=2)
    streamed = editor.edit(tpl.template_id, mask, "b", seed=2)
    assert (streamed.latents - resident.latents).abs().max().item() < 1e-5
    report = editor.pipeline.reports[-1]
    assert all(not t.skipped and t.nbytes > 0 for t in report.blocks)
