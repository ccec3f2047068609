"""Attention that also reports how much probability mass every key received.

STAC's temporal cache (stac-reference.md, section 1) scores each cached token by the attention
mass it receives: the column sum of ``softmax(q k^T * scale + bias)`` over all queries of a step.
Materialising the full ``[Nq, Nk]`` probability matrix is not an option at streaming sizes
(4 frames x 1041 queries against ~10k keys, 16 heads, 24 layers), so this module computes it the
way the reference does, in two blockwise passes over the keys:

1. an online-softmax pass (running max ``m``, running normaliser ``l``, fp32 output accumulator)
   that produces the attention output and each query's log-sum-exp ``lse = m + log(l)``;
2. a second pass that recomputes the scores block by block and accumulates
   ``exp(s - lse)`` per key, summed over the valid queries.

At most ``[B, H, query_block, key_block]`` scores exist at any time. Scores, softmax and
accumulators are fp32 whatever the input dtype (fp64 inputs stay fp64); the output is cast back
to ``q.dtype``. On CPU the result is deterministic (no atomics, fixed block order).

Fast path: with ``need_mass=False``, no masks and a finite bias, the call goes to
``torch.nn.functional.scaled_dot_product_attention`` (bias passed as ``attn_mask`` in
``q.dtype``, so in bf16 the bias itself is rounded to bf16).

Cost (measured on one H100, bf16, B=1, H=16, Nq=4164, Nk=10000, D=64): the blockwise path with
mass took ~27 ms and ~0.8 GB peak; the SDPA fast path ~1 ms. The blockwise path is plain PyTorch;
a fused kernel for the mass pass (as the reference has in Triton/CUDA) is the obvious next step
if the score computation becomes the bottleneck.

Masking conventions
-------------------
* ``key_bias`` is an additive logit bias per key (e.g. ``log(C)`` for a pivot that stands for
  ``C`` merged tokens, so it weighs like ``C`` identical keys). ``-inf`` is allowed and means
  "never attend".
* ``key_valid`` marks keys that exist. Invalid keys get probability 0 and mass exactly 0.
* ``query_valid`` marks query rows that exist. Invalid rows contribute nothing to the mass and
  their output is 0.
* A query with no attendable key (all keys invalid / ``-inf``) gets output 0, never NaN.

Public API: :func:`attention_with_key_mass`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["attention_with_key_mass"]

_NEG_INF = float("-inf")


def _broadcast_to(
    name: str, t: Tensor, shape: tuple[int, ...], expected: str
) -> Tensor:
    """Broadcast ``t`` to ``shape`` or raise a ValueError that names the argument."""
    try:
        torch.broadcast_shapes(tuple(t.shape), shape)
        out = t.expand(shape)
    except RuntimeError as exc:
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} is not broadcastable to {expected}={shape}"
        ) from exc
    return out


def _check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_bias: Tensor | None,
    key_valid: Tensor | None,
    query_valid: Tensor | None,
    key_block: int,
    query_block: int,
) -> tuple[Tensor | None, Tensor | None]:
    """Validate shapes/dtypes; return (key_bias [B,H,Nk] fp32 view, query_valid [B,Nq] view)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k and v must agree on [B, H, Nk]: k {tuple(k.shape)} vs v {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"q and k must agree on [B, H]: q {tuple(q.shape)} vs k {tuple(k.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k head dims differ: q D={q.shape[-1]} vs k D={k.shape[-1]}"
        )
    if q.shape[-1] == 0:
        raise ValueError("head dim D must be > 0")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if isinstance(key_block, bool) or not isinstance(key_block, int) or key_block <= 0:
        raise ValueError(f"key_block must be a positive int, got {key_block!r}")
    if isinstance(query_block, bool) or not isinstance(query_block, int) or query_block <= 0:
        raise ValueError(f"query_block must be a positive int, got {query_block!r}")

    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    bias = None
    if key_bias is not None:
        if not isinstance(key_bias, Tensor) or not key_bias.is_floating_point():
            raise ValueError("key_bias must be a floating-point tensor")
        bias = _broadcast_to("key_bias", key_bias, (B, H, Nk), "[B, H, Nk]")
        bias = bias.to(device=q.device, dtype=torch.promote_types(q.dtype, torch.float32))
    if key_valid is not None:
        if not isinstance(key_valid, Tensor) or key_valid.dtype != torch.bool:
            raise ValueError("key_valid must be a bool tensor")
        kv = _broadcast_to("key_valid", key_valid, (B, H, Nk), "[B, H, Nk]").to(q.device)
        # Fold the key mask into the bias: -inf logits get probability exactly 0.
        base = bias if bias is not None else torch.zeros(
            (B, H, Nk), device=q.device, dtype=torch.promote_types(q.dtype, torch.float32)
        )
        bias = torch.where(kv, base, torch.full_like(base, _NEG_INF))
    qv = None
    if query_valid is not None:
        if not isinstance(query_valid, Tensor) or query_valid.dtype != torch.bool:
            raise ValueError("query_valid must be a bool tensor")
        qv = _broadcast_to("query_valid", query_valid, (B, Nq), "[B, Nq]").to(q.device)
    return bias, qv


def attention_with_key_mass(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_bias: Tensor | None = None,
    key_valid: Tensor | None = None,
    query_valid: Tensor | None = None,
    *,
    key_block: int = 1024,
    query_block: int = 2048,
    need_mass: bool = True,
    mass_query_stride: int = 1,
) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention that also returns the attention mass of every key.

    Args:
        q: queries ``[B, H, Nq, D]``.
        k: keys ``[B, H, Nk, D]``.
        v: values ``[B, H, Nk, Dv]``.
        key_bias: optional additive logit bias, broadcastable to ``[B, H, Nk]``.
        key_valid: optional bool mask broadcastable to ``[B, H, Nk]``; False = key absent.
        query_valid: optional bool mask broadcastable to ``[B, Nq]``; False = padded query row.
        key_block: keys per block (scores held at once: ``[B, H, query_block, key_block]``).
        query_block: queries per block.
        need_mass: if False, only the output is computed and ``None`` is returned for the mass.
        mass_query_stride: sum the mass over query rows 0, S, 2S, ... only and scale it by
            Nq / (rows used): an estimate of the full sum at 1/S of its cost (1: exact).

    Returns:
        ``(out, key_mass)``: ``out`` is ``[B, H, Nq, Dv]`` in ``q.dtype``; ``key_mass`` is
        ``[B, H, Nk]`` float32, the sum over valid queries of each key's softmax probability
        (0 for masked keys), or ``None`` when ``need_mass`` is False.

    Raises:
        ValueError: on malformed shapes, dtypes or block sizes.
    """
    bias, qv = _check_inputs(q, k, v, key_bias, key_valid, query_valid, key_block, query_block)
    if not isinstance(mass_query_stride, int) or mass_query_stride < 1:
        raise ValueError(f"mass_query_stride must be a positive integer, got {mass_query_stride!r}")
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(D)
    # Accumulate in fp32 (fp64 inputs keep fp64 so double-precision callers lose nothing).
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    # Fast path: no mass wanted, no masks and a finite bias -> the fused kernel is equivalent.
    # A bias containing -inf could leave a row with no attendable key, where SDPA returns NaN
    # while this module promises 0, so such biases take the blockwise path.
    if (
        not need_mass
        and key_valid is None
        and query_valid is None
        and Nk > 0
        and (bias is None or bool(torch.isfinite(bias).all()))
    ):
        mask = None if bias is None else bias[:, :, None, :].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return out, None

    out = torch.empty((B, H, Nq, Dv), dtype=q.dtype, device=q.device)
    mass = torch.zeros((B, H, Nk), dtype=acc_dtype, device=q.device) if need_mass else None

    for qs in range(0, Nq, query_block):
        qe = min(qs + query_block, Nq)
        # Fold the softmax scale into q once per query block (fp32 for accumulation).
        q_blk = q[:, :, qs:qe].to(acc_dtype) * scale
        nq = qe - qs

        # ---- pass 1: online softmax ----
        m = torch.full((B, H, nq), _NEG_INF, dtype=acc_dtype, device=q.device)
        l = torch.zeros((B, H, nq), dtype=acc_dtype, device=q.device)
        acc = torch.zeros((B, H, nq, Dv), dtype=acc_dtype, device=q.device)
        for ks in range(0, Nk, key_block):
            ke = min(ks + key_block, Nk)
            s = torch.matmul(q_blk, k[:, :, ks:ke].to(acc_dtype).transpose(-1, -2))
            if bias is not None:
                s = s + bias[:, :, None, ks:ke]
            m_new = torch.maximum(m, s.amax(dim=-1))
            # Rows that have seen only -inf so far keep a 0 reference point, which makes every
            # exp() below exactly 0 instead of NaN (-inf - -inf).
            m_ref = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
            alpha = torch.exp(m - m_ref)
            p = torch.exp(s - m_ref[..., None])
            l = l * alpha + p.sum(dim=-1)
            acc = acc * alpha[..., None] + torch.matmul(p, v[:, :, ks:ke].to(acc_dtype))
            m = m_new

        has_key = l > 0
        if qv is not None:
            has_key = has_key & qv[:, None, qs:qe]
        safe_l = torch.where(has_key, l, torch.ones_like(l))
        o = torch.where(has_key[..., None], acc / safe_l[..., None], torch.zeros_like(acc))
        out[:, :, qs:qe] = o.to(q.dtype)

        if mass is None:
            continue
        # ---- pass 2: per-key mass with the final log-sum-exp ----
        # lse = +inf for rows that must contribute nothing (padded query, or no valid key):
        # exp(s - inf) is exactly 0 for every key.
        m_ref = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
        lse = torch.where(has_key, m_ref + torch.log(safe_l), torch.full_like(l, float("inf")))
        # the rows that count: global indices 0, S, 2S, ... (every row when S = 1)
        first = -qs % mass_query_stride
        q_blk, lse = q_blk[:, :, first::mass_query_stride], lse[:, :, first::mass_query_stride]
        for ks in range(0, Nk, key_block):
            ke = min(ks + key_block, Nk)
            s = torch.matmul(q_blk, k[:, :, ks:ke].to(acc_dtype).transpose(-1, -2))
            if bias is not None:
                s = s + bias[:, :, None, ks:ke]
            p = torch.exp(s - lse[..., None])
            mass[:, :, ks:ke] += p.sum(dim=-2)

    if mass is not None and mass_query_stride > 1:
        mass = mass * (Nq / -(-Nq // mass_query_stride))
    return out, (None if mass is None else mass.float())
