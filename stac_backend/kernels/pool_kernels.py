"""Per-token passes of the voxel pool's insert as single kernels (OpenAI Triton, CUDA only).

In the stress geometry a step files ~1.6 M evicted tokens (24 layers x 16 heads x 4 frames of
tokens). The eager path of each insert round gathers every token's key and its row's pivots as
fp32 copies ([tokens, pivots, head_dim]: ~1.6 GB), normalises both, multiplies and reduces - a
dozen kernels, in chunks. ``nearest_pivot`` reads each token's key and its row's pivot keys once
and writes only the best cosine and slot; ``weighted_row_sums`` gathers, weights and adds the
merged tokens' keys and values into their pivots' accumulators in one pass (fp32 atomics, as
``index_add_`` on CUDA does).

Both follow the eager arithmetic in float32 (normalise by ``max(norm, eps)``, clamp the cosine to
[-1, 1], first maximum on ties), so they agree with it to float32 rounding; the eager path stays
the CPU implementation and the reference in tests. ``STAC_POOL_KERNELS=0`` turns them off.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - CPU-only installs
    HAVE_TRITON = False

ENABLED = os.environ.get("STAC_POOL_KERNELS", "1") != "0"
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def kernels_apply(t: Tensor) -> bool:
    """Use the kernels for tensors on ``t``'s device (CUDA, or CPU in Triton's interpreter)?"""
    return ENABLED and HAVE_TRITON and (t.is_cuda or _INTERPRET)


if HAVE_TRITON:

    # n (the token count) changes every call: not specialised on, so the kernel compiles once.
    @triton.jit(do_not_specialize=["n"])
    def _nearest_pivot(K, TOK, ROW, PK, PC, BEST, SLOT, n, stride_k, eps,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = offs < n
        tok = tl.load(TOK + offs, mask=live, other=0)
        row = tl.load(ROW + offs, mask=live, other=0)
        d = tl.arange(0, BLOCK_D)
        m2 = live[:, None] & (d[None, :] < D)
        k = tl.load(K + tok[:, None] * stride_k + d[None, :], mask=m2, other=0.0).to(tl.float32)
        kn = k / tl.maximum(tl.sqrt(tl.sum(k * k, axis=1)), eps)[:, None]
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        slot = tl.zeros([BLOCK], tl.int64)
        for p in tl.static_range(P):
            pv = tl.load(PK + (row * P + p)[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
            pn = pv / tl.maximum(tl.sqrt(tl.sum(pv * pv, axis=1)), eps)[:, None]
            cos = tl.minimum(tl.maximum(tl.sum(kn * pn, axis=1), -1.0), 1.0)
            used = tl.load(PC + row * P + p, mask=live, other=0.0) > 0
            cos = tl.where(used, cos, float("-inf"))
            better = cos > best  # strict: the first maximum wins ties, as torch.max does
            best = tl.where(better, cos, best)
            slot = tl.where(better, p, slot)
        tl.store(BEST + offs, best, mask=live)
        tl.store(SLOT + offs, slot, mask=live)

    @triton.jit(do_not_specialize=["n"])
    def _weighted_row_sums(K, V, TOK, W, DST, OUT_K, OUT_V, n, stride_k, stride_v,
                           D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = offs < n
        tok = tl.load(TOK + offs, mask=live, other=0)
        dst = tl.load(DST + offs, mask=live, other=0)
        w = tl.load(W + offs, mask=live, other=0.0)
        d = tl.arange(0, BLOCK_D)
        m2 = live[:, None] & (d[None, :] < D)
        k = tl.load(K + tok[:, None] * stride_k + d[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.atomic_add(OUT_K + dst[:, None] * D + d[None, :], w[:, None] * k, mask=m2)
        v = tl.load(V + tok[:, None] * stride_v + d[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.atomic_add(OUT_V + dst[:, None] * D + d[None, :], w[:, None] * v, mask=m2)


_BLOCK = 64


def nearest_pivot(k: Tensor, tok: Tensor, row: Tensor, piv_k: Tensor, piv_c: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Best cosine to a used pivot of its row, and that pivot's slot, for each listed token.

    k [N, D] keys (rows with unit stride); tok [n] int64 rows of ``k``; row [n] int64 flat pool
    rows; piv_k [R, P, D] contiguous; piv_c [R, P] contiguous (a slot is used iff > 0).
    Returns (best [n] float32, -inf where the row has no pivot; slot [n] int64).
    """
    n = tok.numel()
    R, P, D = piv_k.shape
    best = torch.empty(n, dtype=torch.float32, device=k.device)
    slot = torch.empty(n, dtype=torch.int64, device=k.device)
    if n == 0:
        return best, slot
    if k.stride(1) != 1 or not piv_k.is_contiguous() or not piv_c.is_contiguous():
        raise ValueError("nearest_pivot needs unit-stride key rows and contiguous pivot tensors")
    grid = (triton.cdiv(n, _BLOCK),)
    _nearest_pivot[grid](k, tok, row, piv_k, piv_c, best, slot, n, k.stride(0), eps,
                         D=D, BLOCK_D=triton.next_power_of_2(D), P=P, BLOCK=_BLOCK)
    return best, slot


def weighted_row_sums(k: Tensor, v: Tensor, tok: Tensor, weight: Tensor, dst: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """``out_k[dst[i]] += weight[i] * k[tok[i]]`` (and v) in float32, as [rows, D] tensors."""
    D = k.shape[1]
    out_k = torch.zeros(rows, D, dtype=torch.float32, device=k.device)
    out_v = torch.zeros(rows, D, dtype=torch.float32, device=k.device)
    n = tok.numel()
    if n == 0:
        return out_k, out_v
    if k.stride(1) != 1 or v.stride(1) != 1:
        raise ValueError("weighted_row_sums needs unit-stride key and value rows")
    grid = (triton.cdiv(n, _BLOCK),)
    _weighted_row_sums[grid](k, v, tok, weight.float().contiguous(), dst, out_k, out_v, n, k.stride(0), v.stride(0),
                             D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK=_BLOCK)
    return out_k, out_v
