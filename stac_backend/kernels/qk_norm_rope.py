"""Fused q/k LayerNorm + 2D RoPE for the attention layers (OpenAI Triton, CUDA only).

The eager path normalises q and k over their 64-dim heads with ``nn.LayerNorm`` and then rotates
them with ``RotaryEmbedding2D``: about ten kernels per layer that each read and write q and k, and
PyTorch's LayerNorm kernel is slow on rows this short (on the H100 it was ~11% of a batched step).
This kernel reads q and k once from the qkv projection's output and writes the rotated, normalised
heads in the [B, heads, N, head_dim] layout the attention wants.

It reproduces the eager arithmetic step by step, rounding to the working dtype where the eager ops
round (LayerNorm output, each product, the sum), and takes cos/sin from the same tables, so it
agrees with the eager path up to LayerNorm's own reduction order (within one rounding step of the
dtype; exact to ~1e-6 in float32).
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

# STAC_FUSED_QK_ROPE=0 keeps the eager ops (e.g. to compare).
ENABLED = os.environ.get("STAC_FUSED_QK_ROPE", "1") != "0"


if HAVE_TRITON:

    @triton.jit
    def _qk_norm_rope(
        QKV, POS, COS, SIN, WQ, BQ, WK, BK, OUT_Q, OUT_K,
        stride_xb, stride_xn, stride_xw, stride_xh,
        stride_pb, stride_pn,
        stride_ob, stride_oh, stride_on,
        H, N, eps,
        D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        which = tl.program_id(2)  # 0: q, 1: k
        b = bh // H
        h = bh % H
        HALF: tl.constexpr = D // 2  # first half rotated by the row (y), second by the column (x)
        QUARTER: tl.constexpr = D // 4
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        d = tl.arange(0, D)
        # rotate_half inside each half: partner column and sign
        partner = (d // HALF) * HALF + (d % HALF + QUARTER) % HALF
        sign = tl.where(d % HALF < QUARTER, -1.0, 1.0)
        in_n = offs_n < N
        base = QKV + b * stride_xb + which * stride_xw + h * stride_xh + offs_n[:, None] * stride_xn
        x = tl.load(base + d[None, :], mask=in_n[:, None], other=0.0).to(tl.float32)
        xp = tl.load(base + partner[None, :], mask=in_n[:, None], other=0.0).to(tl.float32)
        if which == 0:
            w = tl.load(WQ + d).to(tl.float32)
            bias = tl.load(BQ + d).to(tl.float32)
            wp = tl.load(WQ + partner).to(tl.float32)
            bp = tl.load(BQ + partner).to(tl.float32)
        else:
            w = tl.load(WK + d).to(tl.float32)
            bias = tl.load(BK + d).to(tl.float32)
            wp = tl.load(WK + partner).to(tl.float32)
            bp = tl.load(BK + partner).to(tl.float32)
        mean = tl.sum(x, 1) / D
        xc = x - mean[:, None]
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
        dt = OUT_Q.dtype.element_ty
        y = (xc * rstd[:, None] * w[None, :] + bias[None, :]).to(dt).to(tl.float32)
        yp = ((xp - mean[:, None]) * rstd[:, None] * wp[None, :] + bp[None, :]).to(dt).to(tl.float32)
        pos = tl.load(POS + b * stride_pb + offs_n[:, None] * stride_pn + (d // HALF)[None, :], mask=in_n[:, None], other=0)
        table = pos * HALF + (d % HALF)[None, :]
        c = tl.load(COS + table, mask=in_n[:, None], other=0.0).to(tl.float32)
        s = tl.load(SIN + table, mask=in_n[:, None], other=0.0).to(tl.float32)
        out = ((y * c).to(dt).to(tl.float32) + (sign[None, :] * yp * s).to(dt).to(tl.float32)).to(dt)
        o_ptrs = b * stride_ob + h * stride_oh + offs_n[:, None] * stride_on + d[None, :]
        if which == 0:
            tl.store(OUT_Q + o_ptrs, out, mask=in_n[:, None])
        else:
            tl.store(OUT_K + o_ptrs, out, mask=in_n[:, None])


def fused_applies(qkv: Tensor, q_norm, head_dim: int) -> bool:
    """Whether the fused kernel can stand in for the eager ops here (CUDA, inference, LayerNorm with
    affine parameters, a power-of-two head dim of at least 16)."""
    return (
        ENABLED
        and HAVE_TRITON
        and qkv.is_cuda
        and not torch.is_grad_enabled()
        and isinstance(q_norm, torch.nn.LayerNorm)
        and q_norm.elementwise_affine
        and q_norm.bias is not None
        and head_dim >= 16
        and head_dim & (head_dim - 1) == 0
    )


def qk_norm_rope(
    qkv: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, q_norm: torch.nn.LayerNorm, k_norm: torch.nn.LayerNorm,
    block_n: int = 64,
) -> tuple[Tensor, Tensor]:
    """qkv [B, N, 3, H, D] (the projection's output), positions [B, N, 2] integer (y, x), cos/sin
    tables [length, D/2] -> q, k [B, H, N, D], normalised and rotated."""
    B, N, three, H, D = qkv.shape
    if three != 3 or qkv.stride(-1) != 1:
        raise ValueError(f"qkv must be [B, N, 3, H, D] with unit stride in D, got {tuple(qkv.shape)}")
    if positions.shape != (B, N, 2) or positions.stride(-1) != 1:
        raise ValueError(f"positions must be [B, N, 2] = {(B, N, 2)}, got {tuple(positions.shape)}")
    if cos.shape[-1] != D // 2 or not cos.is_contiguous() or not sin.is_contiguous():
        raise ValueError(f"cos/sin must be contiguous tables [length, {D // 2}]")
    if q_norm.eps != k_norm.eps:
        raise ValueError("q and k LayerNorms must share eps")
    q = torch.empty(B, H, N, D, device=qkv.device, dtype=qkv.dtype)
    k = torch.empty_like(q)
    _qk_norm_rope[(triton.cdiv(N, block_n), B * H, 2)](
        qkv, positions, cos, sin, q_norm.weight, q_norm.bias, k_norm.weight, k_norm.bias, q, k,
        qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.stride(3),
        positions.stride(0), positions.stride(1),
        q.stride(0), q.stride(1), q.stride(2),
        H, N, q_norm.eps,
        D=D, BLOCK_N=block_n, num_warps=4,
    )
    return q, k
