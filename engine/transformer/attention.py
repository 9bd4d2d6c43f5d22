"""Attention of packed sequences: a variable-length kernel on CUDA, and cached/fresh key sets merged by LSE.

Two ways to attend a sequence's queries to [text K/V | template image K/V with the masked rows fresh]:

* **Buffer** (`segment_attention`): build that key buffer per sequence (one copy of the cached rows, the
  fresh rows written over the stale ones) and run one kernel. On CUDA the packed batch goes through a real
  variable-length kernel, chosen at run time (`varlen_backend`): torch's own `varlen_attn` (torch >= 2.9),
  else `flash_attn.flash_attn_varlen_func` when the flash-attn package is installed, else a loop of SDPA
  calls per sequence (`sdpa-loop`, also the CPU and fp32 path).
* **Split** (`split_attention`): attend to the cached rows in place, with the stale (masked) rows masked
  out, and separately to the fresh rows (text + masked image tokens); merge the two by their log-sum-exp.
  No copy of the cache at all. Needs a kernel that returns the log-sum-exp: on CPU torch's flash kernel
  does (`lse_split_available`); CUDA keeps the buffer, which its varlen kernel needs anyway. A small fresh
  set (a small mask: ~100 rows) is attended with two batched matmuls instead (`_small_attention`).
* **Joint scores** (`joint_attention`, CPU fp32, few queries): the scores against the cached rows and against
  the fresh rows are written side by side into one reused (heads, L, N + L) block, the stale columns set to
  -inf, one softmax over the whole row, and the output is P_cached V_cached + P_fresh V_fresh. No key buffer,
  no log-sum-exp merge, and none of the flash kernel's 32-row query tiles.

Both are exact: the split differs from the buffer only by float rounding (tested at 1e-5 in fp32).
"""
from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F

BACKENDS = ("torch-varlen", "flash-attn", "sdpa-loop")


@functools.lru_cache(maxsize=None)
def _importable(backend: str) -> bool:
    try:
        if backend == "torch-varlen":
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        elif backend == "flash-attn":
            from flash_attn import flash_attn_varlen_func  # noqa: F401
        else:
            return True
    except ImportError:
        return False
    return True


def varlen_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The attention kernel packed batches use on this device and dtype (first of BACKENDS that applies)."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        for backend in ("torch-varlen", "flash-attn"):
            if _importable(backend):
                return backend
    return "sdpa-loop"


def available_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Every backend that can run here (for tests and the GPU check), best first."""
    found = []
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        found = [b for b in ("torch-varlen", "flash-attn") if _importable(b)]
    return found + ["sdpa-loop"]


def segment_attention(q: list[torch.Tensor], k: list[torch.Tensor], v: list[torch.Tensor],
                      backend: str | None = None) -> list[torch.Tensor]:
    """Attention of each segment's queries over that segment's keys/values only.

    Each list item is one sequence: q (Lq, heads, d), k/v (heads, Lk, d) -- keys/values are kept head-major so
    the large cached buffers go to the kernel without another copy. Returns (Lq, heads*d) per segment.
    """
    if not q:
        return []
    backend = backend or varlen_backend(q[0].device, q[0].dtype)
    if backend == "torch-varlen":
        return _torch_varlen(q, k, v)
    if backend == "flash-attn":
        return _flash_attn_varlen(q, k, v)
    if backend != "sdpa-loop":
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    out = []
    for qs, ks, vs in zip(q, k, v):
        o = F.scaled_dot_product_attention(qs.transpose(0, 1).unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0))
        out.append(o[0].transpose(0, 1).flatten(1))
    return out


def _packed(q, k, v):
    """Token-major packed tensors and the cumulative lengths every varlen kernel takes."""
    device = q[0].device
    lq = [t.shape[0] for t in q]
    lk = [t.shape[1] for t in k]
    cu_q = torch.tensor([0] + lq, device=device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + lk, device=device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    keys = torch.cat([t.transpose(0, 1) for t in k])
    values = torch.cat([t.transpose(0, 1) for t in v])
    return torch.cat(q), keys, values, cu_q, cu_k, max(lq), max(lk), lq


def _torch_varlen(q, k, v):  # pragma: no cover - needs a GPU
    from torch.nn.attention.varlen import varlen_attn

    query, keys, values, cu_q, cu_k, max_q, max_k, lq = _packed(q, k, v)
    # positional only: the keyword arguments after max_k differ between torch releases
    out = varlen_attn(query, keys, values, cu_q, cu_k, max_q, max_k)
    return [o.flatten(1) for o in out.split(lq)]


def _flash_attn_varlen(q, k, v):  # pragma: no cover - needs a GPU and flash-attn
    from flash_attn import flash_attn_varlen_func

    query, keys, values, cu_q, cu_k, max_q, max_k, lq = _packed(q, k, v)
    out = flash_attn_varlen_func(query, keys, values, cu_q, cu_k, max_q, max_k)
    return [o.flatten(1) for o in out.split(lq)]


# -- split attention ----------------------------------------------------------------------------------------

def _cpu_lse_op():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def lse_split_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `split_attention` can run here: torch's CPU flash kernel, which also returns the log-sum-exp."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and _cpu_lse_op() is not None


def stale_mask(n: int, masked: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Additive mask (1, 1, 1, n) hiding the masked rows of a cached key set; None if every row is masked."""
    if masked.numel() >= n:
        return None
    mask = torch.zeros(n, dtype=dtype, device=device)
    mask[masked] = float("-inf")
    return mask.view(1, 1, 1, n)


#: fresh key sets up to this many rows are attended with two batched matmuls (`_small_attention`)
SMALL_KEYS = 256


def _small_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, log-sum-exp) of softmax(q k^T / sqrt(d)) v for (1, heads, L, d) operands, in fp32.

    With a small mask the fresh key set is ~100 rows: the flash kernel's per-tile work costs more there than
    two batched matmuls and one pass of exp over a (heads, L, L) score block that stays in cache. The row sums
    normalise the (L, d) output rather than the (L, L) weights (`logsumexp` would take a second exp pass).
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    peak = scores.amax(dim=-1, keepdim=True)
    total = scores.sub_(peak).exp_().sum(dim=-1, keepdim=True)
    return torch.matmul(scores, v).div_(total), peak.add_(total.log_()).squeeze(-1)


#: a sequence with up to this many queries attends by `joint_attention` on CPU in fp32 (see `use_joint`): from
#: 192 queries on torch's CPU flash kernel takes 64-row query tiles and is as fast (measured at 252 queries)
JOINT_QUERIES = 191
#: the per-thread score block `joint_attention` writes into is kept between calls up to this many bytes
_SCRATCH_KEEP_BYTES = 64 << 20
_scratch = threading.local()


def use_joint(q: torch.Tensor, mask: torch.Tensor | None, *operands: torch.Tensor) -> bool:
    """Whether `split_attention` takes the joint-score path: fp32 on CPU, few queries, some cached row valid, and
    no autograd on q or any other operand (it writes into a reused buffer with `out=`)."""
    return (q.dtype == torch.float32 and q.device.type == "cpu" and q.shape[0] <= JOINT_QUERIES
            and mask is not None
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, *operands))))


def _score_block(heads: int, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """A (heads, rows, cols) scratch block, reused per thread: a fresh multi-MB tensor per call costs page
    faults on every block of every step (glibc hands large blocks back to the kernel when they are freed)."""
    need = heads * rows * cols
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < need or buf.dtype != like.dtype or buf.device != like.device:
        with torch.inference_mode(False):  # a normal tensor: usable inside and outside inference mode
            buf = torch.empty(need, dtype=like.dtype, device=like.device)
        if need * buf.element_size() <= _SCRATCH_KEEP_BYTES:
            _scratch.buf = buf
    return buf[:need].view(heads, rows, cols)


def joint_attention(q: torch.Tensor, k_fresh: torch.Tensor, v_fresh: torch.Tensor, k_cached: torch.Tensor,
                    v_cached: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`split_attention` for few queries in fp32: one softmax over [cached scores | fresh scores].

    Same operands as `split_attention` (mask not None). With ~100 queries torch's CPU flash kernel works in
    32-row query tiles at a fraction of its large-tile rate; here the scores are two batched GEMMs written
    side by side into one block, the stale columns get -inf from the additive mask, one in-place softmax
    normalises each row over both key sets at once, and the output is two GEMMs summed (`baddbmm`).
    Exact up to fp32 rounding: the softmax of the union, no merge of partial results.
    """
    length, heads, d = q.shape
    n = k_cached.shape[1]
    qs = q.transpose(0, 1) * d ** -0.5  # (heads, L, d)
    scores = _score_block(heads, length, n + length, q)
    cached, fresh = scores[..., :n], scores[..., n:]
    torch.bmm(qs, k_cached.transpose(1, 2), out=cached)
    torch.bmm(qs, k_fresh.permute(1, 2, 0), out=fresh)
    cached.add_(mask.view(n))
    torch.softmax(scores, dim=-1, out=scores)
    out = torch.baddbmm(torch.bmm(fresh, v_fresh.transpose(0, 1)), cached, v_cached)
    return out.transpose(0, 1).flatten(1)


def split_attention(q: torch.Tensor, k_fresh: torch.Tensor, v_fresh: torch.Tensor, k_cached: torch.Tensor,
                    v_cached: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One sequence's attention over fresh rows and cached rows without building a joint key buffer.

    q, k_fresh, v_fresh: (L, heads, d); k_cached, v_cached: (heads, N, d) head-major, as cached; mask: from
    `stale_mask` (the cached rows that the fresh ones replace), None when no cached row is valid.
    Returns (Lq, heads * d). softmax over the union = the two partial softmaxes weighted by
    sigmoid(lse_cached - lse_fresh), their share of the total mass.
    """
    if use_joint(q, mask, k_fresh, v_fresh, k_cached, v_cached):
        return joint_attention(q, k_fresh, v_fresh, k_cached, v_cached, mask)
    op = _cpu_lse_op()
    qh = q.transpose(0, 1).unsqueeze(0)
    kh, vh = k_fresh.transpose(0, 1).unsqueeze(0), v_fresh.transpose(0, 1).unsqueeze(0)
    if q.dtype == torch.float32 and k_fresh.shape[0] <= SMALL_KEYS:
        o_fresh, lse_fresh = _small_attention(qh, kh, vh)
    else:  # larger sets, and half precision (the flash kernel accumulates in fp32, these matmuls would not)
        o_fresh, lse_fresh = op(qh, kh, vh, 0.0, False)
    if mask is None:
        return o_fresh[0].transpose(0, 1).flatten(1)
    o_cached, lse_cached = op(qh, k_cached.unsqueeze(0), v_cached.unsqueeze(0), 0.0, False, attn_mask=mask)
    weight = torch.sigmoid(lse_cached - lse_fresh).unsqueeze(-1).to(o_fresh.dtype)
    out = torch.lerp(o_fresh, o_cached, weight)  # o_fresh + w * (o_cached - o_fresh)
    return out[0].transpose(0, 1).flatten(1)
