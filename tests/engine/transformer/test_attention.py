"""Packed attention: the cached/fresh split merged by log-sum-exp and the varlen kernels against the segment loop."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from instgenie.engine.transformer import attention
from instgenie.engine.transformer.attention import (
    available_backends, joint_attention, lse_split_available, segment_attention, split_attention, stale_mask,
    use_joint, varlen_backend,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _reference(q, k_fresh, v_fresh, k_cached, v_cached, masked):
    """Attention over [fresh rows | cached rows except the masked ones], in float64."""
    keep = torch.ones(k_cached.shape[1], dtype=torch.bool)
    keep[masked] = False
    keys = torch.cat([k_fresh.transpose(0, 1), k_cached[:, keep]], dim=1).double()
    values = torch.cat([v_fresh.transpose(0, 1), v_cached[:, keep]], dim=1).double()
    out = F.scaled_dot_product_attention(q.transpose(0, 1).double()[None], keys[None], values[None])
    return out[0].transpose(0, 1).flatten(1)


@pytest.fixture(params=["joint", "lse-merge"])
def split_path(request, monkeypatch):
    """Run a test through each CPU fp32 path of `split_attention`: joint scores, or flash + log-sum-exp merge;
    the test's end checks that the path it named is the one that ran."""
    joint = request.param == "joint"
    monkeypatch.setattr(attention, "JOINT_QUERIES", 10**9 if joint else 0)
    calls = []
    monkeypatch.setattr(attention, "joint_attention",
                        lambda *a, _f=attention.joint_attention: (calls.append(1), _f(*a))[1])
    path = SimpleNamespace(name=request.param, applies=True)  # a test with no valid cached row sets applies
    yield path
    assert bool(calls) == (joint and path.applies), f"{request.param}: joint_attention ran {len(calls)} times"


@pytest.mark.parametrize("masked_count", [1, 37, 255, 256])
def test_split_attention_equals_attention_over_the_union(masked_count, split_path):
    assert lse_split_available(torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(masked_count)
    heads, n, d, t = 4, 256, 32, 7
    masked = torch.randperm(n, generator=g)[:masked_count].sort().values
    q = torch.randn(t + masked_count, heads, d, generator=g)
    k_fresh = torch.randn(t + masked_count, heads, d, generator=g)
    v_fresh = torch.randn(t + masked_count, heads, d, generator=g)
    k_cached = torch.randn(heads, n, d, generator=g) * 3  # larger logits: the merge weights are far from 0.5
    v_cached = torch.randn(heads, n, d, generator=g)
    mask = stale_mask(n, masked, torch.float32, torch.device("cpu"))
    assert (mask is None) == (masked_count == n)  # every cached row replaced: nothing to attend to there
    split_path.applies = mask is not None
    out = split_attention(q, k_fresh, v_fresh, k_cached, v_cached, mask)
    expected = _reference(q, k_fresh, v_fresh, k_cached, v_cached, masked)
    assert out.shape == (t + masked_count, heads * d)
    assert (out.double() - expected).abs().max().item() < 1e-5


def test_stale_rows_never_leak_into_the_split(split_path):
    """A huge value in a stale cached row would dominate if the mask let it through."""
    heads, n, d = 2, 16, 8
    q = torch.randn(5, heads, d)
    k_fresh, v_fresh = torch.randn(5, heads, d), torch.randn(5, heads, d)
    k_cached, v_cached = torch.randn(heads, n, d), torch.randn(heads, n, d)
    masked = torch.tensor([3, 9])
    k_cached[:, masked] = q.mean(0).unsqueeze(1) * 100
    v_cached[:, masked] = 1e6
    out = split_attention(q, k_fresh, v_fresh, k_cached, v_cached, stale_mask(n, masked, torch.float32, q.device))
    assert out.abs().max().item() < 100
    expected = _reference(q, k_fresh, v_fresh, k_cached, v_cached, masked)
    assert (out.double() - expected).abs().max().item() < 1e-5


def _operands(g, length, heads, n, d, masked):
    q, k_fresh, v_fresh = (torch.randn(length, heads, d, generator=g) for _ in range(3))
    k_cached, v_cached = torch.randn(heads, n, d, generator=g) * 2, torch.randn(heads, n, d, generator=g)
    return q, k_fresh, v_fresh, k_cached, v_cached, stale_mask(n, masked, torch.float32, q.device)


def test_joint_attention_reuses_its_score_block_across_shapes_and_modes():
    """The per-thread score block is reused: a smaller call after a larger one, then a larger one again, under
    inference mode, no_grad and plain mode in turn. Every output is checked after the last call, against
    float64 attention over the union: an output that aliased the block would have been overwritten."""
    g = torch.Generator().manual_seed(5)
    modes = [torch.inference_mode, torch.no_grad, torch.inference_mode, torch.no_grad, torch.enable_grad]
    shapes = [(40, 4, 200, 32), (9, 2, 64, 16), (60, 4, 300, 32), (9, 2, 64, 16), (1, 1, 8, 4)]
    done = []
    for mode, (length, heads, n, d) in zip(modes, shapes):
        masked = torch.randperm(n, generator=g)[:max(1, length - 3)].sort().values
        ops = _operands(g, length, heads, n, d, masked)
        with mode():
            out = joint_attention(*ops)
        assert out.shape == (length, heads * d)
        done.append((out, ops, masked))
    for out, ops, masked in done:
        assert (out.double() - _reference(*ops[:5], masked)).abs().max().item() < 1e-5


def test_joint_path_is_chosen_only_where_it_applies():
    q = torch.randn(10, 2, 8)
    mask = stale_mask(16, torch.tensor([1, 2]), torch.float32, q.device)
    assert use_joint(q, mask)
    assert not use_joint(q, None)  # every cached row stale: the fresh rows alone
    assert not use_joint(q.bfloat16(), mask)  # half precision keeps the flash kernel's fp32 accumulation
    assert not use_joint(torch.randn(attention.JOINT_QUERIES + 1, 2, 8), mask)  # 64-row flash tiles from there
    with torch.enable_grad():  # out= into the score block would raise under autograd, on any operand
        assert not use_joint(q.clone().requires_grad_(), mask)
        assert not use_joint(q, mask, torch.randn(2, 16, 8, requires_grad=True))
        assert use_joint(q, mask, torch.randn(2, 16, 8))


def test_cpu_selects_the_segment_loop_and_refuses_unknown_backends():
    assert varlen_backend(torch.device("cpu"), torch.bfloat16) == "sdpa-loop"
    assert available_backends(torch.device("cpu"), torch.float32) == ["sdpa-loop"]
    q = [torch.randn(3, 2, 4)]
    k = [torch.randn(2, 5, 4)]
    with pytest.raises(ValueError, match="unknown attention backend"):
        segment_attention(q, k, k, backend="nope")


def _segments(device, dtype, lengths_q=(5, 130, 1), lengths_k=(40, 300, 17), heads=4, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = [torch.randn(lq, heads, d, generator=g).to(device, dtype) for lq in lengths_q]
    k = [torch.randn(heads, lk, d, generator=g).to(device, dtype) for lk in lengths_k]
    v = [torch.randn(heads, lk, d, generator=g).to(device, dtype) for lk in lengths_k]
    return q, k, v


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_varlen_kernels_match_the_segment_loop(dtype):
    device = torch.device("cuda")
    q, k, v = _segments(device, dtype)
    expected = segment_attention(q, k, v, backend="sdpa-loop")
    backends = available_backends(device, dtype)
    assert varlen_backend(device, dtype) == backends[0]
    for backend in backends:
        out = segment_attention(q, k, v, backend=backend)
        for o, e in zip(out, expected):
            assert o.shape == e.shape
            # both are half-precision kernels with float accumulation: equal to a few half-precision ulps
            assert (o.float() - e.float()).abs().max().item() < 2e-2, backend


@cuda
def test_cuda_has_a_real_varlen_kernel():
    """torch's own varlen kernel (torch >= 2.9) or flash-attn: the packed batch is one kernel, not a loop."""
    assert varlen_backend(torch.device("cuda"), torch.bfloat16) in ("torch-varlen", "flash-attn")
