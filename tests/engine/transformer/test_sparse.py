"""The packed mask-aware forward against the dense reference, one transformer call at a time."""
from __future__ import annotations

import pytest
import torch

from instgenie.engine.latents import image_ids
from instgenie.engine.transformer.cache_view import StepCache
from instgenie.engine.transformer.reference import dense_forward
from instgenie.engine.transformer.sparse import PackedStep, sparse_forward


def _inputs(model, sequences, seed=0):
    tr = model.transformer
    h = w = model.info.resolution[0] // model.codec.scale_factor
    n = (h // 2) * (w // 2)
    g = torch.Generator().manual_seed(seed)
    text = model.text.encode([f"prompt {i}" for i in range(sequences)])
    device, dtype = model.device, model.dtype
    return dict(
        latents=torch.randn(sequences, n, tr.config.in_channels, generator=g).to(device, dtype),
        prompt_embeds=text.prompt_embeds, pooled=text.pooled,
        timestep=torch.rand(sequences, generator=g).to(device),  # every sequence at its own timestep
        txt_ids=text.text_ids, img_ids=image_ids(h, w, device, dtype),
        guidance=torch.full((sequences,), 3.5, device=device) if tr.config.guidance_embeds else None,
    )


def _random_masks(n, sequences, seed):
    g = torch.Generator().manual_seed(seed)
    masks = []
    for s in range(sequences):
        ratio = [0.05, 0.3, 0.7, 1.0][s % 4]
        keep = torch.rand(n, generator=g) < ratio
        keep[s] = True  # never empty
        masks.append(keep)
    return torch.stack(masks)


def _template_cache(model, inputs, mode):
    record = {}
    dense_forward(model.transformer, **inputs, mode=mode, record=record)
    return [StepCache(record, branch=s) for s in range(inputs["latents"].shape[0])]


@pytest.mark.parametrize("mode", ["kv", "y"])
@pytest.mark.parametrize("preset", ["tiny_model", "small_model"])
@pytest.mark.parametrize("sequences", [1, 4])  # 1: the gather-free path, a 5 % mask (the batch-1 benchmark's case)
def test_packed_batch_matches_dense_reference(preset, mode, sequences, request):
    model = request.getfixturevalue(preset)
    template = _inputs(model, sequences, seed=1)
    caches = _template_cache(model, template, mode)
    edit = _inputs(model, sequences, seed=2)
    keep = _random_masks(edit["latents"].shape[1], sequences, seed=3)
    # Unmasked tokens carry the template's inputs, as the inpaint blend guarantees in a real edit.
    edit["latents"] = torch.where(keep[..., None], edit["latents"], template["latents"])
    dense = dense_forward(model.transformer, **edit, mode=mode, caches=caches, keep=keep)
    index = [k.nonzero().flatten() for k in keep]
    step = PackedStep(
        x=torch.cat([edit["latents"][s, idx] for s, idx in enumerate(index)]), token_index=index,
        prompt_embeds=edit["prompt_embeds"], pooled=edit["pooled"], timestep=edit["timestep"],
        txt_ids=edit["txt_ids"], img_ids=edit["img_ids"], caches=caches, mode=mode, guidance=edit["guidance"],
        x_full=edit["latents"] if mode == "y" else None,
    )
    packed = sparse_forward(model.transformer, step)
    expected = torch.cat([dense[s, idx] for s, idx in enumerate(index)])
    assert packed.shape == expected.shape
    assert (packed - expected).abs().max().item() < 1e-5


def test_y_mode_blocks_computed_in_full_match_reference(small_model):
    model = small_model
    template = _inputs(model, 2, seed=4)
    caches = _template_cache(model, template, "y")
    edit = _inputs(model, 2, seed=5)
    keep = _random_masks(edit["latents"].shape[1], 2, seed=6)
    edit["latents"] = torch.where(keep[..., None], edit["latents"], template["latents"])
    use_cache = [False, False, True, False, True, True]  # e.g. a planner that recomputes leading blocks
    dense = dense_forward(model.transformer, **edit, mode="y", caches=caches, keep=keep, use_cache=use_cache)
    index = [k.nonzero().flatten() for k in keep]
    step = PackedStep(
        x=torch.cat([edit["latents"][s, idx] for s, idx in enumerate(index)]), token_index=index,
        prompt_embeds=edit["prompt_embeds"], pooled=edit["pooled"], timestep=edit["timestep"],
        txt_ids=edit["txt_ids"], img_ids=edit["img_ids"], caches=caches, mode="y", guidance=edit["guidance"],
        x_full=edit["latents"], use_cache=use_cache,
    )
    packed = sparse_forward(model.transformer, step)
    expected = torch.cat([dense[s, idx] for s, idx in enumerate(index)])
    assert (packed - expected).abs().max().item() < 1e-5
    # Computing blocks in full really changes the result (the unmasked rows are fresh, not cached).
    all_cached = dense_forward(model.transformer, **edit, mode="y", caches=caches, keep=keep)
    assert (all_cached - dense).abs().max().item() > 1e-6


def test_kv_mode_refuses_full_blocks(tiny_model):
    inputs = _inputs(tiny_model, 1)
    caches = _template_cache(tiny_model, inputs, "kv")
    step = PackedStep(x=inputs["latents"][0, :3], token_index=[torch.arange(3)], prompt_embeds=inputs["prompt_embeds"],
                      pooled=inputs["pooled"], timestep=inputs["timestep"], txt_ids=inputs["txt_ids"],
                      img_ids=inputs["img_ids"], caches=caches, mode="kv", use_cache=[False, True, True])
    with pytest.raises(ValueError, match="Y-mode"):
        sparse_forward(tiny_model.transformer, step)


@pytest.mark.parametrize("mode", ["kv", "y"])
def test_recording_does_not_change_the_stock_forward(small_model, mode):
    inputs = _inputs(small_model, 2, seed=8)
    stock = dense_forward(small_model.transformer, **inputs)
    record = {}
    recorded = dense_forward(small_model.transformer, **inputs, mode=mode, record=record)
    assert torch.equal(stock, recorded)
    blocks = small_model.num_blocks
    assert len(record) == (2 * blocks if mode == "kv" else blocks)


@pytest.mark.parametrize("mode", ["kv", "y"])
def test_identity_edit_reproduces_the_template_output(small_model, mode):
    """Masked tokens given the template's own inputs: the sparse rows equal the template's full forward."""
    inputs = _inputs(small_model, 1, seed=9)
    caches = _template_cache(small_model, inputs, mode)
    full = dense_forward(small_model.transformer, **inputs)
    idx = torch.tensor([0, 5, 17, 100, 255])
    step = PackedStep(x=inputs["latents"][0, idx], token_index=[idx], prompt_embeds=inputs["prompt_embeds"],
                      pooled=inputs["pooled"], timestep=inputs["timestep"], txt_ids=inputs["txt_ids"],
                      img_ids=inputs["img_ids"], caches=caches, mode=mode, guidance=inputs["guidance"],
                      x_full=inputs["latents"] if mode == "y" else None)
    out = sparse_forward(small_model.transformer, step)
    assert (out - full[0, idx]).abs().max().item() < 1e-5


def _edit_step(model, mode, sequences, seed):
    template = _inputs(model, sequences, seed=seed)
    caches = _template_cache(model, template, mode)
    edit = _inputs(model, sequences, seed=seed + 1)
    keep = _random_masks(edit["latents"].shape[1], sequences, seed=seed + 2).to(model.device)
    edit["latents"] = torch.where(keep[..., None], edit["latents"], template["latents"])
    index = [k.nonzero().flatten() for k in keep]
    step = PackedStep(
        x=torch.cat([edit["latents"][s, idx] for s, idx in enumerate(index)]), token_index=index,
        prompt_embeds=edit["prompt_embeds"], pooled=edit["pooled"], timestep=edit["timestep"],
        txt_ids=edit["txt_ids"], img_ids=edit["img_ids"], caches=caches, mode=mode, guidance=edit["guidance"],
        x_full=edit["latents"] if mode == "y" else None,
    )
    return edit, caches, keep, index, step


@pytest.mark.parametrize("sequences", [1, 3])
def test_kv_buffer_path_matches_split_path_and_reference(small_model, sequences, monkeypatch):
    """The joint key buffer (CUDA's path, varlen kernels need it) and the LSE split (CPU) agree with the oracle."""
    from instgenie.engine.transformer import sparse

    edit, caches, keep, index, step = _edit_step(small_model, "kv", sequences, seed=20)
    dense = dense_forward(small_model.transformer, **edit, mode="kv", caches=caches, keep=keep)
    expected = torch.cat([dense[s, idx] for s, idx in enumerate(index)])
    split = sparse_forward(small_model.transformer, step)
    monkeypatch.setattr(sparse, "lse_split_available", lambda device, dtype: False)
    buffered = sparse_forward(small_model.transformer, step)
    assert (split - expected).abs().max().item() < 1e-5
    assert (buffered - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("mode", ["kv", "y"])
def test_cpu_weight_kinds_match_reference(small_model, mode, monkeypatch):
    """fp32 CPU projections from oneDNN's prepacked weights (GELU fused) and from the (in, out) copies kept for
    other dtypes: both match the oracle, and each kind is memoised apart (switching never serves the other)."""
    from instgenie.engine.transformer import sparse_blocks

    edit, caches, keep, index, step = _edit_step(small_model, mode, 2, seed=40)
    dense = dense_forward(small_model.transformer, **edit, mode=mode, caches=caches, keep=keep)
    expected = torch.cat([dense[s, idx] for s, idx in enumerate(index)])
    block = small_model.transformer.single_transformer_blocks[0]
    kinds = {}
    for onednn in (True, False, True):
        monkeypatch.setattr(sparse_blocks, "ONEDNN_LINEAR", onednn)
        out = sparse_forward(small_model.transformer, step)
        assert (out - expected).abs().max().item() < 1e-5, onednn
        kinds[onednn] = sparse_blocks._fused_linear(block, ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))
    if torch.backends.mkldnn.is_available():
        assert kinds[True][3] == "onednn" and kinds[True][0].is_mkldnn
    assert kinds[False][3] == "transposed" and not kinds[False][0].is_mkldnn


def test_complex_rope_equals_diffusers_rotary_embedding(small_model):
    from diffusers.models.embeddings import apply_rotary_emb

    from instgenie.engine.transformer.sparse_blocks import rope, rope_table

    inputs = _inputs(small_model, 1)
    cos, sin, freqs = rope_table(small_model.transformer, inputs["txt_ids"], inputs["img_ids"])
    heads, d = 4, small_model.transformer.config.attention_head_dim
    x = torch.randn(1, cos.shape[0], heads, d)
    expected = apply_rotary_emb(x, (cos, sin), sequence_dim=1)
    assert (rope(x[0], freqs.unsqueeze(1)) - expected[0]).abs().max().item() < 1e-6


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("mode", ["kv", "y"])
def test_cuda_packed_batch_matches_dense_reference(model_root, mode):
    """fp32 on the GPU: the segment loop against the same oracle; bf16: the varlen kernel, at bf16 precision."""
    from instgenie.engine.models.loader import preset_model

    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        model = preset_model("flux-small", root=model_root, device="cuda", dtype=dtype)
        edit, caches, keep, index, step = _edit_step(model, mode, 4, seed=30)
        dense = dense_forward(model.transformer, **edit, mode=mode, caches=caches, keep=keep).float()
        packed = sparse_forward(model.transformer, step).float()
        expected = torch.cat([dense[s, idx] for s, idx in enumerate(index)])
        scale = max(1.0, expected.abs().max().item())
        assert (packed - expected).abs().max().item() < tolerance * scale, dtype
