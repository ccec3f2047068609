"""Fused GPU attention that also returns each key's probability mass (OpenAI Triton).

out[b,h,i]  = sum_j softmax_j(q_i . k_j * scale + bias_j) v_j
mass[b,h,j] = sum_i softmax_j(q_i . k_j * scale + bias_j)          (summed over the step's queries)

Two kernels, never materialising the [M, N] probability matrix:
1. ``_forward``: flash-attention forward per query block (online softmax over key blocks, fp32
   accumulators), writing the output and each query's log-sum-exp (base 2);
2. ``_key_mass``: per key block, a loop over all query blocks that recomputes the scores and sums
   exp2(s - lse) down the queries - no atomics, deterministic. On 16-bit inputs the sum runs on the
   tensor cores (probabilities as float16 times a ones matrix) and the exponentials are taken two
   per instruction in float16 (``MASS_METHODS``); float32 inputs keep an exact float32 sum.
The output pass can take its exponentials the same way (``FORWARD_EXPS``, opt-in: it does not
pay there). Work: two q.k^T products and one p.v product, 1.5x plain attention's FLOPs. The mass
pass runs only over the keys whose mass the caller reads (``mass_keys``): blocks of keys that all
have bias -inf there (padding of a batch, a policy's retrieved keys) skip it and get mass 0.

``bias`` is an additive per-key logit bias (log C for merged pivots); invalid (padding) keys are
passed as a bias of -inf. Keys whose bias is -inf receive mass 0; a query with no finite key gets
output 0. Inputs bf16/fp16/fp32 on CUDA, head dim 16..256 (power of two).

``_forward_segmented`` / ``_key_mass_segmented`` are the same passes over keys held in pieces
(``fused_segmented_attention_with_key_mass``): each batch row's keys are a list of segments, e.g. a
view of a cache store, retrieved tokens and the step's new tokens, read where they lie through a
table of their offsets instead of being copied into one padded buffer first.
"""

from __future__ import annotations

import math
import os
from array import array
from typing import NamedTuple, Optional

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - CPU-only installs
    HAVE_TRITON = False

LOG2E = 1.4426950408889634

# The segmented kernels' table has one row per (batch row, segment): where the segment's k and v
# data start, as element offsets from q's data (the kernels address every segment from the q
# pointer), their head strides in elements, the segment's key count and its first key's index in
# the row's concatenated keys. Tokens are D elements apart in every segment.
SEGMENT_FIELDS = ("k_offset", "v_offset", "k_head_stride", "v_head_stride", "length", "start")


if HAVE_TRITON:
    SEG_FIELDS = tl.constexpr(len(SEGMENT_FIELDS))

    @triton.jit
    def _forward_block(
        q, m_i, l_i, acc, start_n, K_base, V_base, BIAS_base, stride_kn, stride_vn, N, qk_scale,
        HAS_BIAS: tl.constexpr, MASK_N: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
        HALF_EXP: tl.constexpr,
    ):
        """One key block of the online softmax; MASK_N only for the ragged last block. HALF_EXP takes
        the probabilities' exponentials in float16, two per instruction (``_exp2_f16``): the p.v
        product rounds them to 16 bits anyway, and the normaliser sums them in float32."""
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        if MASK_N:
            in_n = offs_n < N
            k = tl.load(K_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=in_n[:, None], other=0.0)
            v = tl.load(V_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=in_n[:, None], other=0.0)
        else:
            k = tl.load(K_base + offs_n[:, None] * stride_kn + offs_d[None, :])
            v = tl.load(V_base + offs_n[:, None] * stride_vn + offs_d[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            # the bias arrives already in log2 units
            if MASK_N:
                bias = tl.load(BIAS_base + offs_n, mask=in_n, other=float("-inf"))
            else:
                bias = tl.load(BIAS_base + offs_n)
            s += bias[None, :]
        elif MASK_N:
            s = tl.where(in_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen no finite key yet keep a finite reference point.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        if HALF_EXP:
            p = _exp2_f16(s - m_ref[:, None])
        else:
            p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _program_ids(H):
        """A program's block index along grid axis 0, and its (batch row x head) index along axis 1
        with the batch row and head it stands for."""
        bh = tl.program_id(1)
        return tl.program_id(0), bh, bh // H, bh % H

    @triton.jit
    def _forward_start(Q, stride_qb, stride_qh, stride_qm, H, M, D: tl.constexpr, BLOCK_M: tl.constexpr):
        """A forward program's (batch row, head, query block): its indices, its queries and the
        online softmax's empty state (running max, normaliser, output accumulator)."""
        pid_m, bh, b, h = _program_ids(H)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
        q = tl.load(q_ptrs, mask=offs_m[:, None] < M, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        return b, h, bh, offs_m, offs_d, q, m_i, l_i, acc

    @triton.jit
    def _forward(
        Q, K, V, BIAS, OUT, LSE,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_bb, stride_bh,
        stride_ob, stride_oh, stride_om,
        H, M, N, qk_scale,
        HAS_BIAS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, HALF_EXP: tl.constexpr,
    ):
        b, h, bh, offs_m, offs_d, q, m_i, l_i, acc = _forward_start(Q, stride_qb, stride_qh, stride_qm, H, M, D, BLOCK_M)
        K_base = K + b * stride_kb + h * stride_kh
        V_base = V + b * stride_vb + h * stride_vh
        BIAS_base = BIAS + b * stride_bb + h * stride_bh
        m_i, l_i, acc = _forward_keys(q, m_i, l_i, acc, K_base, V_base, BIAS_base, stride_kn, stride_vn, N, qk_scale,
                                      HAS_BIAS, D, BLOCK_N, PRECISION, HALF_EXP)
        _forward_store(m_i, l_i, acc, OUT, LSE, b, h, bh, offs_m, offs_d, stride_ob, stride_oh, stride_om, M)

    @triton.jit
    def _forward_keys(
        q, m_i, l_i, acc, K_base, V_base, BIAS_base, stride_kn, stride_vn, N, qk_scale,
        HAS_BIAS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, HALF_EXP: tl.constexpr,
    ):
        """The online softmax over N keys at K_base/V_base: whole blocks unmasked, then the ragged tail."""
        n_full = (N // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            m_i, l_i, acc = _forward_block(q, m_i, l_i, acc, start_n, K_base, V_base, BIAS_base, stride_kn, stride_vn, N,
                                           qk_scale, HAS_BIAS, False, D, BLOCK_N, PRECISION, HALF_EXP)
        if n_full < N:
            m_i, l_i, acc = _forward_block(q, m_i, l_i, acc, n_full, K_base, V_base, BIAS_base, stride_kn, stride_vn, N,
                                           qk_scale, HAS_BIAS, True, D, BLOCK_N, PRECISION, HALF_EXP)
        return m_i, l_i, acc

    @triton.jit
    def _forward_store(m_i, l_i, acc, OUT, LSE, b, h, bh, offs_m, offs_d, stride_ob, stride_oh, stride_om, M):
        """Normalise and store the output rows and their log-sum-exp (+inf, output 0 where no key was finite)."""
        has_key = l_i > 0
        out = tl.where(has_key[:, None], acc / tl.where(has_key, l_i, 1.0)[:, None], 0.0)
        o_ptrs = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=offs_m[:, None] < M)
        lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
        tl.store(LSE + bh * M + offs_m, lse, mask=offs_m < M)

    @triton.jit
    def _forward_segmented(
        Q, SEGS, BIAS, OUT, LSE,
        stride_qb, stride_qh, stride_qm,
        stride_bb, stride_bh,
        stride_ob, stride_oh, stride_om,
        H, M, S, qk_scale,
        HAS_BIAS: tl.constexpr, D: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, HALF_EXP: tl.constexpr,
    ):
        """``_forward`` over keys held in separate tensors: batch row b's keys are its S segments
        (``SEGS`` [B, S, SEG_FIELDS], see ``_segment_table``) one after the other, each read in place.
        The segments are addressed from Q: their offsets and head strides are multiples of ALIGN
        elements (16 bytes) and Q is 16-byte aligned, so the key/value loads stay 128-bit wide."""
        b, h, bh, offs_m, offs_d, q, m_i, l_i, acc = _forward_start(Q, stride_qb, stride_qh, stride_qm, H, M, D, BLOCK_M)
        for s in range(S):
            seg = SEGS + (b * S + s) * SEG_FIELDS
            K_base = Q + tl.multiple_of(tl.load(seg + 0), ALIGN) + h * tl.multiple_of(tl.load(seg + 2), ALIGN)
            V_base = Q + tl.multiple_of(tl.load(seg + 1), ALIGN) + h * tl.multiple_of(tl.load(seg + 3), ALIGN)
            n = tl.load(seg + 4).to(tl.int32)
            start = tl.load(seg + 5).to(tl.int32)
            BIAS_base = BIAS + b * stride_bb + h * stride_bh + start
            m_i, l_i, acc = _forward_keys(q, m_i, l_i, acc, K_base, V_base, BIAS_base, D, D, n, qk_scale,
                                          HAS_BIAS, D, BLOCK_N, PRECISION, HALF_EXP)
        _forward_store(m_i, l_i, acc, OUT, LSE, b, h, bh, offs_m, offs_d, stride_ob, stride_oh, stride_om, M)

    @triton.jit
    def _exp2_f16(x):
        """exp2 of float32 scores as float16, two per instruction (ex2.approx.f16x2): half the
        special-function work of one float32 exp2 per score. An approximation at about float16
        precision (tests: mass sums within 0.2% of the exact ones); results below float16's range
        (2^-24) become 0. CUDA only (inline PTX)."""
        return tl.inline_asm_elementwise(
            asm="{ cvt.rn.f16x2.f32 $0, $2, $1; ex2.approx.f16x2 $0, $0; }",
            constraints="=r,r,r", args=[x], dtype=tl.float16, is_pure=True, pack=2,
        )

    @triton.jit
    def _key_mass_block(
        k, bias, acc, q_ptrs, lse_ptrs, start_m, M, qk_scale,
        MASK_M: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, METHOD: tl.constexpr,
    ):
        """One query block's probabilities for this program's keys, added to ``acc``.

        Transposed (keys x queries), so the sum over queries is along axis 1: METHOD 0 adds the
        float32 probabilities elementwise (exact; reduced once at the end), METHODs 1 and 2 feed
        them as float16 into a tensor-core product with a ones matrix (float32 accumulation), so no
        cross-warp reduction runs per block; METHOD 2 also takes the exponentials two at a time.
        Rows past M need no mask here: their q is 0 and their lse +inf, so their exp2 is 0.
        """
        offs_m = start_m + tl.arange(0, BLOCK_M)
        if MASK_M:
            q = tl.load(q_ptrs, mask=offs_m[:, None] < M, other=0.0)
            lse = tl.load(lse_ptrs, mask=offs_m < M, other=float("inf"))
        else:
            q = tl.load(q_ptrs)
            lse = tl.load(lse_ptrs)
        s = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        x = s * qk_scale + (bias[:, None] - lse[None, :])
        if METHOD == 0:
            acc += tl.exp2(x)
        else:
            if METHOD == 2:
                p = _exp2_f16(x)
            else:
                p = tl.exp2(x).to(tl.float16)
            acc = tl.dot(p, tl.full([BLOCK_M, 16], 1.0, tl.float16), acc)
        return acc

    @triton.jit
    def _key_mass(
        Q, K, BIAS, LSE, MASS,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        stride_bb, stride_bh,
        H, M, N, qk_scale,
        HAS_BIAS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, METHOD: tl.constexpr,
    ):
        pid_n, bh, b, h = _program_ids(H)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        offs_m = tl.arange(0, BLOCK_M)
        in_n = offs_n < N
        k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=in_n[:, None], other=0.0)
        if HAS_BIAS:
            bias = tl.load(BIAS + b * stride_bb + h * stride_bh + offs_n, mask=in_n, other=float("-inf"))  # log2 units
        else:
            bias = tl.where(in_n, 0.0, float("-inf"))
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
        mass = _key_mass_sum(k, bias, q_ptrs, LSE + bh * M + offs_m, stride_qm, M, qk_scale,
                             BLOCK_M, BLOCK_N, PRECISION, METHOD)
        tl.store(MASS + bh * N + offs_n, mass, mask=in_n)

    @triton.jit
    def _key_mass_sum(
        k, bias, q_ptrs, lse_ptrs, stride_qm, M, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, METHOD: tl.constexpr,
    ):
        """The mass of a block of keys (k [BLOCK_N, D], bias in log2 units): their probabilities
        summed over the M queries."""
        if METHOD == 0:
            acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        else:
            acc = tl.zeros([BLOCK_N, 16], tl.float32)
        m_full = (M // BLOCK_M) * BLOCK_M
        # A block of keys that all have bias -inf (padding, or keys whose mass nobody reads) has
        # mass 0: its pass over the queries is skipped.
        if tl.max(bias, 0) > float("-inf"):
            for start_m in range(0, m_full, BLOCK_M):
                acc = _key_mass_block(k, bias, acc, q_ptrs + start_m * stride_qm, lse_ptrs + start_m, start_m, M,
                                      qk_scale, False, BLOCK_M, PRECISION, METHOD)
            if m_full < M:
                acc = _key_mass_block(k, bias, acc, q_ptrs + m_full * stride_qm, lse_ptrs + m_full, m_full, M,
                                      qk_scale, True, BLOCK_M, PRECISION, METHOD)
        if METHOD == 0:
            return tl.sum(acc, 1)
        return tl.max(acc, 1)  # 16 equal columns

    @triton.jit
    def _key_mass_segmented(
        Q, SEGS, SLOT_BLOCKS, BIAS, LSE, MASS,
        stride_qb, stride_qh, stride_qm,
        stride_bb, stride_bh,
        H, M, S, N, qk_scale,
        HAS_BIAS: tl.constexpr, D: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, METHOD: tl.constexpr,
    ):
        """``_key_mass`` over segmented keys (``_forward_segmented``). The programs along axis 0
        cover segment slot 0's key blocks, then slot 1's, ...: slot s's start at program
        SLOT_BLOCKS[s] (non-decreasing, SLOT_BLOCKS[0] = 0), as many as the longest segment s of any
        row has. Where a row's segment is shorter (or absent) the program's keys are masked and it
        stores nothing. N: the concatenated length of MASS's key axis."""
        pid_n, bh, b, h = _program_ids(H)
        # this program's slot: the last whose first program is at or before it (S is small)
        slot = tl.full([], 0, tl.int32)
        slot_begin = tl.full([], 0, tl.int32)
        for s in range(1, S):
            begin = tl.load(SLOT_BLOCKS + s).to(tl.int32)
            later = pid_n >= begin
            slot = tl.where(later, s, slot)
            slot_begin = tl.where(later, begin, slot_begin)
        first = (pid_n - slot_begin) * BLOCK_N
        seg = SEGS + (b * S + slot) * SEG_FIELDS
        K_base = Q + tl.multiple_of(tl.load(seg + 0), ALIGN) + h * tl.multiple_of(tl.load(seg + 2), ALIGN)
        n = tl.load(seg + 4).to(tl.int32)
        start = tl.load(seg + 5).to(tl.int32)
        offs_n = first + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        offs_m = tl.arange(0, BLOCK_M)
        in_n = offs_n < n
        k = tl.load(K_base + offs_n[:, None] * D + offs_d[None, :], mask=in_n[:, None], other=0.0)
        if HAS_BIAS:
            bias = tl.load(BIAS + b * stride_bb + h * stride_bh + start + offs_n, mask=in_n, other=float("-inf"))
        else:
            bias = tl.where(in_n, 0.0, float("-inf"))
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
        mass = _key_mass_sum(k, bias, q_ptrs, LSE + bh * M + offs_m, stride_qm, M, qk_scale,
                             BLOCK_M, BLOCK_N, PRECISION, METHOD)
        tl.store(MASS + bh * N + start + offs_n, mass, mask=in_n)


def _log2_bias(bias: Optional[Tensor], valid: Optional[Tensor], B: int, H: int, N: int, device) -> Optional[Tensor]:
    """The per-key bias [B,H,N] in log2 units (the kernels work with exp2), -inf where not valid; None if neither."""
    if bias is None and valid is None:
        return None
    full = torch.zeros(B, H, N, device=device, dtype=torch.float32)
    if bias is not None:
        full = full + bias.float().expand(B, H, N) * LOG2E
    if valid is not None:
        full = full.masked_fill(~valid.expand(B, H, N), float("-inf"))
    return full.contiguous()


def _kernel_bias(bias: Optional[Tensor], valid: Optional[Tensor], B: int, H: int, N: int, q: Tensor):
    """The kernels' bias argument: (tensor in log2 units, whether there is one, its batch and head
    strides); without one, q stands in as a pointer that is never read."""
    full = _log2_bias(bias, valid, B, H, N, q.device)
    if full is None:
        return q, False, (0, 0)
    return full, True, (full.stride(0), full.stride(1))


def _mass_bias(bias, valid, mass_keys: Optional[Tensor], B: int, H: int, N: int, q: Tensor, output_pass_bias):
    """The key-mass pass's bias argument: the output pass's, or with the keys whose mass nobody reads
    (``mass_keys`` False) at -inf too, so that their blocks skip the pass."""
    if mass_keys is None:
        return output_pass_bias
    return _kernel_bias(bias, mass_keys if valid is None else mass_keys & valid, B, H, N, q)


def fused_attention_with_key_mass(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, valid: Optional[Tensor] = None, need_mass: bool = True,
    block_m: int = 128, block_n: int = 64, num_warps: int = 8, num_stages: int = 3,
    mass_block_m: int = 64, mass_block_n: int = 128, mass_num_warps: int = 4, mass_num_stages: int = 3,
    mass_method: str = "auto", mass_keys: Optional[Tensor] = None, forward_exp: str = "auto",
    mass_query_stride: int = 1,
) -> tuple[Tensor, Optional[Tensor]]:
    """q [B,H,M,D], k/v [B,H,N,D], bias [B,H,N] (float), valid [B,H,N] (bool) -> out [B,H,M,D], mass [B,H,N] fp32.

    mass_keys [B,H,N] (bool): the keys whose mass the caller reads; the others get mass 0, and
    blocks of keys none of which is read skip the mass pass (the mass of a read key is exactly
    what it is without this mask: it depends on its own score and its query's LSE only).

    mass_method: how the key-mass pass sums probabilities (``MASS_METHODS``); "auto" = "exact" for
    float32 inputs and off CUDA (Triton's interpreter), else ``DEFAULT_MASS_METHOD`` (env
    STAC_MASS_METHOD overrides it).

    mass_query_stride: the mass pass reads query rows 0, S, 2S, ... only and scales the sums by
    M / (rows read), as ``attention_with_key_mass`` does (1: every row).

    forward_exp: how the output pass takes its exponentials (``FORWARD_EXPS``); "auto" = "float32"
    for float32 inputs and off CUDA, else ``DEFAULT_FORWARD_EXP`` (env STAC_FORWARD_EXP overrides it).
    """
    if not HAVE_TRITON:
        raise RuntimeError("the fused attention kernel needs OpenAI Triton (pip install triton) and a CUDA GPU")
    B, H, M, D = q.shape
    N = k.shape[2]
    if D & (D - 1) or not 16 <= D <= 256:
        raise ValueError(f"head dim must be a power of two in [16, 256], got {D}")
    if k.shape != (B, H, N, D) or v.shape != (B, H, N, D):
        raise ValueError(f"k/v must be [B,H,N,{D}] matching q: q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    # The kernels take any batch/head/row strides; only the head dim must be unit-stride, so the
    # views the caches hand over (slices of larger buffers) are not copied.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    full_bias, has_bias, bias_strides = _kernel_bias(bias, valid, B, H, N, q)
    out = torch.empty_like(q)
    lse = torch.empty(B * H, M, device=q.device, dtype=torch.float32)
    qk_scale = LOG2E / math.sqrt(D)
    # fp32 inputs get exact fp32 products (tl.dot would otherwise use TF32 on tensor cores)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _forward[(triton.cdiv(M, block_m), B * H)](
        q, k, v, full_bias, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *bias_strides,
        out.stride(0), out.stride(1), out.stride(2),
        H, M, N, qk_scale,
        HAS_BIAS=has_bias, D=D, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision,
        HALF_EXP=resolve_forward_exp(forward_exp, q) == "float16x2",
        num_warps=num_warps, num_stages=num_stages,
    )
    if not need_mass:
        return out, None
    if not isinstance(mass_query_stride, int) or mass_query_stride < 1:
        raise ValueError(f"mass_query_stride must be a positive integer, got {mass_query_stride!r}")
    mass_q, mass_lse, mass_m = _mass_queries(q, lse, mass_query_stride)
    mass_bias, has_mass_bias, bias_strides = _mass_bias(bias, valid, mass_keys, B, H, N, q,
                                                        (full_bias, has_bias, bias_strides))
    mass = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    _key_mass[(triton.cdiv(N, mass_block_n), B * H)](
        mass_q, k, mass_bias, mass_lse, mass,
        mass_q.stride(0), mass_q.stride(1), mass_q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        *bias_strides,
        H, mass_m, N, qk_scale,
        HAS_BIAS=has_mass_bias, D=D, BLOCK_M=mass_block_m, BLOCK_N=mass_block_n, PRECISION=precision,
        METHOD=MASS_METHODS[resolve_mass_method(mass_method, q)],
        num_warps=mass_num_warps, num_stages=mass_num_stages,
    )
    if mass_m != M:
        mass *= M / mass_m
    return out, mass


def _readable_in_place(t: Tensor, q: Tensor) -> bool:
    """Whether the segmented kernels can read the [H, n, D] segment ``t`` where it lies: tokens D
    elements apart, unit last stride, data 16 bytes from q's data times some integer and a head
    stride of whole 16 bytes (what their alignment hints promise, so loads are 128-bit)."""
    if (t.data_ptr() - q.data_ptr()) % 16:
        return False
    if t.is_contiguous():  # (the common case, checked first: this runs per segment per layer)
        return True
    H, n, D = t.shape
    head, token, last = t.stride()
    return last == 1 and (token == D or n == 1) and (head * t.element_size() % 16 == 0 or H == 1)


def _in_place_or_copy(t: Tensor, q: Tensor, keep: list) -> Tensor:
    """``t`` in q's dtype, as the segmented kernels can read it: itself, or a copy (appended to ``keep``)."""
    if t.dtype != q.dtype:
        t = t.to(q.dtype)
    if _readable_in_place(t, q):
        return t
    t = t.contiguous()
    if not _readable_in_place(t, q):  # contiguous already but misaligned: a fresh allocation is aligned
        t = t.clone()
    keep.append(t)
    return t


class _SegmentTable(NamedTuple):
    table: Tensor  # int64 [B * S * len(SEGMENT_FIELDS)] on q's device, rows padded to S segments with empty ones
    S: int
    lengths: list[int]  # each row's key count
    # int64 [S + 1] on q's device: the key-mass kernel's first program of each segment slot (slot s
    # takes ceil(longest segment s of any row / block_n) programs), then their total
    slot_blocks: Tensor
    mass_programs: int
    copies: list[Tensor]  # of the segments not readable in place: they must outlive the launches


def _segment_table(q: Tensor, segments, block_n: int) -> _SegmentTable:
    """The segmented kernels' tables for ``segments`` (see ``fused_segmented_attention_with_key_mass``).

    This runs on the host per layer and step, so it keeps to plain Python ints.
    """
    B, H, _, D = q.shape
    S = max((len(row) for row in segments), default=0)
    values, lengths, keep = array("q"), [], []
    slot_length = [0] * S
    q_ptr, size = q.data_ptr(), q.element_size()
    for row in segments:
        start = 0
        for s, (k, v) in enumerate(row):
            n = k.shape[1]
            if k.shape != (H, n, D) or v.shape != (H, n, D):
                raise ValueError(f"segment k/v must be [H, n, D] = [{H}, n, {D}]: {tuple(k.shape)} {tuple(v.shape)}")
            if k.device != q.device or v.device != q.device:
                raise ValueError(f"segments must be on q's device {q.device}: {k.device} {v.device}")
            if n == 0:
                values.extend((0, 0, 0, 0, 0, start))
                continue
            k, v = _in_place_or_copy(k, q, keep), _in_place_or_copy(v, q, keep)
            values.extend(((k.data_ptr() - q_ptr) // size, (v.data_ptr() - q_ptr) // size,
                           k.stride(0) if H > 1 else 0, v.stride(0) if H > 1 else 0, n, start))
            slot_length[s] = max(slot_length[s], n)
            start += n
        for _ in range(S - len(row)):
            values.extend((0, 0, 0, 0, 0, start))
        lengths.append(start)
    n_table = len(values)
    values.append(0)
    for n in slot_length:
        values.append(values[-1] + -(-n // block_n))
    # One host-to-device copy for both tables, from pinned memory so that it never waits for the
    # GPU's queue to drain (a copy from pageable memory may).
    table = torch.frombuffer(values, dtype=torch.int64)
    if q.is_cuda:
        table = table.pin_memory()
    table = table.to(q.device, non_blocking=True)
    return _SegmentTable(table[:n_table], S, lengths, table[n_table:], values[-1], keep)


def fused_segmented_attention_with_key_mass(
    q: Tensor, segments, bias: Optional[Tensor] = None, valid: Optional[Tensor] = None, need_mass: bool = True,
    block_m: int = 128, block_n: int = 64, num_warps: int = 8, num_stages: int = 3,
    mass_block_m: int = 64, mass_block_n: int = 128, mass_num_warps: int = 4, mass_num_stages: int = 3,
    mass_method: str = "auto", mass_keys: Optional[Tensor] = None, forward_exp: str = "auto",
    mass_query_stride: int = 1,
) -> tuple[Tensor, Optional[Tensor]]:
    """``fused_attention_with_key_mass`` over keys held in pieces, read where they lie (no padded copy).

    q [B,H,M,D]; ``segments``: B lists, row b's a list of (k, v) pairs, each [H, n, D] (n may be
    0) in q's dtype on q's device. Row b's keys are its segments one after the other; N = the
    longest row's count. bias/valid/mass_keys [B,H,N] are in those concatenated coordinates; keys
    past a row's end are absent whatever they say (probability 0, mass 0). Returns out [B,H,M,D]
    and mass [B,H,N] float32 (or None), what ``fused_attention_with_key_mass`` gives on the
    zero-padded concatenation with the padding invalid, up to float rounding (the blocks of keys
    are taken per segment).

    A segment is read in place when its tokens are D elements apart, with unit last stride, and
    it lies a multiple of 16 bytes from q with a head stride of whole 16 bytes (e.g. any slice
    ``buffer[:, :n]`` of a contiguous [H, capacity, D] buffer); any other is copied first.
    """
    if not HAVE_TRITON:
        raise RuntimeError("the fused attention kernel needs OpenAI Triton (pip install triton) and a CUDA GPU")
    B, H, M, D = q.shape
    if D & (D - 1) or not 16 <= D <= 256:
        raise ValueError(f"head dim must be a power of two in [16, 256], got {D}")
    if len(segments) != B:
        raise ValueError(f"{B} query rows but {len(segments)} rows of segments")
    if not isinstance(mass_query_stride, int) or mass_query_stride < 1:
        raise ValueError(f"mass_query_stride must be a positive integer, got {mass_query_stride!r}")
    if q.stride(-1) != 1 or q.data_ptr() % 16:
        # the segments are addressed from q's pointer, which must be 16-byte aligned for wide loads
        q = q.clone(memory_format=torch.contiguous_format)
    segs = _segment_table(q, segments, mass_block_n)  # (holds the copies made until both kernels are queued)
    N = max(segs.lengths, default=0)
    full_bias, has_bias, bias_strides = _kernel_bias(bias, valid, B, H, N, q)
    out = torch.empty_like(q)
    lse = torch.empty(B * H, M, device=q.device, dtype=torch.float32)
    qk_scale = LOG2E / math.sqrt(D)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    align = 16 // q.element_size()
    _forward_segmented[(triton.cdiv(M, block_m), B * H)](
        q, segs.table, full_bias, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        *bias_strides,
        out.stride(0), out.stride(1), out.stride(2),
        H, M, segs.S, qk_scale,
        HAS_BIAS=has_bias, D=D, ALIGN=align, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision,
        HALF_EXP=resolve_forward_exp(forward_exp, q) == "float16x2",
        num_warps=num_warps, num_stages=num_stages,
    )
    if not need_mass:
        return out, None
    mass_q, mass_lse, mass_m = _mass_queries(q, lse, mass_query_stride)
    mass_bias, has_mass_bias, bias_strides = _mass_bias(bias, valid, mass_keys, B, H, N, q,
                                                        (full_bias, has_bias, bias_strides))
    # keys past a row's end get no program that stores: their mass is this zero
    mass = torch.zeros(B, H, N, device=q.device, dtype=torch.float32)
    if segs.mass_programs:
        _key_mass_segmented[(segs.mass_programs, B * H)](
            mass_q, segs.table, segs.slot_blocks, mass_bias, mass_lse, mass,
            mass_q.stride(0), mass_q.stride(1), mass_q.stride(2),
            *bias_strides,
            H, mass_m, segs.S, N, qk_scale,
            HAS_BIAS=has_mass_bias, D=D, ALIGN=align, BLOCK_M=mass_block_m, BLOCK_N=mass_block_n,
            PRECISION=precision, METHOD=MASS_METHODS[resolve_mass_method(mass_method, q)],
            num_warps=mass_num_warps, num_stages=mass_num_stages,
        )
    if mass_m != M:
        mass *= M / mass_m
    return out, mass


def _mass_queries(q: Tensor, lse: Tensor, mass_query_stride: int) -> tuple[Tensor, Tensor, int]:
    """The query rows the mass pass reads (a strided view of q: rows 0, S, 2S, ...), their LSE rows and their count."""
    if mass_query_stride == 1:
        return q, lse, q.shape[2]
    mass_q = q[:, :, ::mass_query_stride]
    return mass_q, lse[:, ::mass_query_stride].contiguous(), mass_q.shape[2]


# How the key-mass pass sums each key's probabilities over the queries (kernel constexpr METHOD):
#   exact:               float32 probabilities added elementwise, one reduction at the end
#   tensor_core:         float32 exp2, probabilities as float16 summed by a product with ones
#   tensor_core_f16_exp: the same with exp2 taken in float16, two scores per instruction
# The float16 forms round each probability to 11 bits before a float32 sum: the mass is a score
# that ranks keys (decayed, top-k), far coarser than that rounding.
MASS_METHODS = {"exact": 0, "tensor_core": 1, "tensor_core_f16_exp": 2}
DEFAULT_MASS_METHOD = "tensor_core_f16_exp"


def _resolve(name: str, method: str, q: Tensor, choices, exact: str, env: str, default: str) -> str:
    """An "auto" choice: ``exact`` for float32 inputs and off CUDA, else the environment's or the default."""
    if method == "auto":
        if q.dtype == torch.float32 or q.device.type != "cuda":
            return exact
        method = os.environ.get(env, default)
    if method not in choices:
        raise ValueError(f"{name} must be 'auto' or one of {sorted(choices)}, got {method!r}")
    return method


def resolve_mass_method(method: str, q: Tensor) -> str:
    return _resolve("mass_method", method, q, MASS_METHODS, "exact", "STAC_MASS_METHOD", DEFAULT_MASS_METHOD)


# How the output pass takes exp2 of the scores (kernel constexpr HALF_EXP):
#   float32:   one float32 exp2 per score
#   float16x2: float16 exp2, two scores per instruction, half the special-function work. The p.v
#              product takes the probabilities in 16 bits either way; what changes is that the
#              exponent is rounded to float16 first (about 1e-3 relative per probability) and
#              probabilities below 2^-24 of the row's largest count as 0.
# float16x2 is opt-in: on an H100 the output pass took 1.13x longer with it (the conversions cost
# more than the exponentials save; docs/performance.md), unlike the key-mass pass, where it pays.
FORWARD_EXPS = ("float32", "float16x2")
DEFAULT_FORWARD_EXP = "float32"


def resolve_forward_exp(method: str, q: Tensor) -> str:
    return _resolve("forward_exp", method, q, FORWARD_EXPS, "float32", "STAC_FORWARD_EXP", DEFAULT_FORWARD_EXP)


def fused_available(device: torch.device) -> bool:
    return HAVE_TRITON and device.type == "cuda"


def sdpa_with_lse(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Attention output and natural-log LSE [B,H,M] from PyTorch's fused kernels (flash without a
    bias, memory-efficient with one). bias: [B,H,N] additive per-key logits (-inf = masked)."""
    B, H, M, _ = q.shape
    if bias is None:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2]
    else:
        full = bias.to(q.dtype)[:, :, None, :].expand(B, H, M, bias.shape[-1])
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, full, True, 0.0, False)[:2]
    return out, lse[..., :M].float()


def hybrid_attention_with_key_mass(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, valid: Optional[Tensor] = None, need_mass: bool = True,
) -> tuple[Tensor, Optional[Tensor]]:
    """PyTorch's fused attention for the output and LSE, then the Triton key-mass pass.

    The output pass is the vendor kernel; only the per-key mass (one extra q.k^T pass, no p.v) is
    ours. Same contract as ``fused_attention_with_key_mass``.
    """
    B, H, M, D = q.shape
    N = k.shape[2]
    full_bias = _log2_bias(bias, valid, B, H, N, q.device)
    out, lse = sdpa_with_lse(q, k, v, None if full_bias is None else full_bias / LOG2E)
    if not need_mass:
        return out, None
    q, k = q.contiguous(), k.contiguous()
    lse2 = (lse * LOG2E).reshape(B * H, M).contiguous()
    # rows with no finite key: the vendor kernels give -inf/NaN LSE; they contribute no mass
    lse2 = torch.where(torch.isfinite(lse2), lse2, torch.full_like(lse2, float("inf")))
    mass = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    has_bias = full_bias is not None
    placeholder = full_bias if has_bias else q
    strides = (full_bias.stride(0), full_bias.stride(1)) if has_bias else (0, 0)
    _key_mass[(triton.cdiv(N, 128), B * H)](
        q, k, placeholder, lse2, mass,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        *strides, H, M, N, LOG2E / math.sqrt(D),
        HAS_BIAS=has_bias, D=D, BLOCK_M=64, BLOCK_N=128, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        METHOD=MASS_METHODS[resolve_mass_method("auto", q)], num_warps=4, num_stages=3,
    )
    return out, mass
