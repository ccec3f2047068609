"""OpenAI-Triton kernels written for TensorRT's AOT plugin calling convention.

A quickly-deployable plugin's ``@trtp.aot_impl`` hands TensorRT ONE compiled kernel that TensorRT
launches with the arguments ``(input pointers..., int32 extra args..., output pointers...)``. It
cannot launch a second kernel, gets no workspace and may not pass float scalars. These kernels are
therefore shaped for that contract (``attention_mass.py``'s kernels are not: they take strides,
a float scale and an LSE scratch tensor, and need two launches):

- tensors are TensorRT's dense (linear, contiguous) buffers, so offsets come from the sizes;
- float parameters (softmax scale, gamma) and the head dim are compile-time constants;
- every output element is written by the kernel (TensorRT does not zero outputs).

``StacAttention``:
- ``attention_out_kernel`` (need_mass=0, the ``full`` graph): flash-attention forward, grid
  ``(cdiv(M, BLOCK_M), B*H)``; the unused mass output is zero-filled by the ``pid_m == 0`` programs.
- ``attention_mass_kernel`` (need_mass=1): the per-key mass needs every query's log-sum-exp
  before any key's column sum. Without a second launch or a workspace, one program owns one
  (batch, head) row: per query block it computes the output and LSE, then adds that block's
  probability column sums into the row's mass (read-modify-write by the owning program only: no
  atomics, no zero-init dependency, deterministic). Grid ``(B*H,)`` - less parallel than the
  two-kernel JIT path, the price of the one-kernel contract.
``StacScoreDecay``: ``score_decay_kernel``, one program per (batch, layer, head) row.

Numerics follow ``attention_mass.py`` (base-2 online softmax, fp32 accumulators, -inf bias for
invalid keys, a query with no valid key gets output 0 and gives no mass) and
``ops.score_decay_impl`` (live keys / queries rescaling, gamma decay of the old scores).
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - CPU-only installs without triton
    HAVE_TRITON = False

LOG2E = 1.4426950408889634


if HAVE_TRITON:

    @triton.jit
    def _key_bias(BIAS, VALID, row, offs_n, N):
        """Per-key additive logit (base 2): bias where valid, -inf for invalid and padded keys."""
        in_n = offs_n < N
        bias = tl.load(BIAS + row * N + offs_n, mask=in_n, other=0.0)
        valid = tl.load(VALID + row * N + offs_n, mask=in_n, other=0).to(tl.int1)
        return tl.where(valid & in_n, bias * 1.4426950408889634, float("-inf"))

    @triton.jit
    def _attend(Q, K, V, BIAS, VALID, row, offs_m, M, N, QK_SCALE: tl.constexpr, D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        """Output [BLOCK_M, D] (fp32) and base-2 LSE (+inf for rows without a valid key) of one query block."""
        offs_d = tl.arange(0, D)
        q = tl.load(Q + (row * M + offs_m)[:, None] * D + offs_d[None, :], mask=(offs_m < M)[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kv_mask = (offs_n < N)[:, None]
            k = tl.load(K + (row * N + offs_n)[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * QK_SCALE
            s += _key_bias(BIAS, VALID, row, offs_n, N)[None, :]
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no finite key yet
            p = tl.exp2(s - m_ref[:, None])
            alpha = tl.exp2(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + (row * N + offs_n)[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        has_key = l_i > 0
        out = tl.where(has_key[:, None], acc / tl.where(has_key, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
        return out, lse

    @triton.jit
    def _zero_row(MASS, row, N, BLOCK_N: tl.constexpr):
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            tl.store(MASS + row * N + offs_n, tl.zeros([BLOCK_N], tl.float32), mask=offs_n < N)

    @triton.jit
    def attention_out_kernel(
        Q, K, V, BIAS, VALID,  # inputs: q [B,H,M,D], k/v [B,H,N,D], key_bias [B,H,N] f32, key_valid [B,H,N] bool
        H, M, N,  # int32 extra args
        OUT, MASS,  # outputs: out [B,H,M,D], mass [B,H,N] f32 (zeros: need_mass=0)
        QK_SCALE: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        row = tl.program_id(1).to(tl.int64)  # b * H + h; int64 so offsets cannot overflow
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        out, lse = _attend(Q, K, V, BIAS, VALID, row, offs_m, M, N, QK_SCALE, D, BLOCK_M, BLOCK_N, PRECISION)
        offs_d = tl.arange(0, D)
        tl.store(OUT + (row * M + offs_m)[:, None] * D + offs_d[None, :], out.to(OUT.dtype.element_ty),
                 mask=(offs_m < M)[:, None])
        if pid_m == 0:
            _zero_row(MASS, row, N, BLOCK_N)

    @triton.jit
    def attention_mass_kernel(
        Q, K, V, BIAS, VALID,
        H, M, N,
        OUT, MASS,  # mass [B,H,N] f32: sum over the M queries of each key's probability
        QK_SCALE: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offs_d = tl.arange(0, D)
        _zero_row(MASS, row, N, BLOCK_N)
        tl.debug_barrier()  # the zeros are visible to every thread of the program before the sums
        for start_m in range(0, M, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            in_m = offs_m < M
            out, lse = _attend(Q, K, V, BIAS, VALID, row, offs_m, M, N, QK_SCALE, D, BLOCK_M, BLOCK_N, PRECISION)
            tl.store(OUT + (row * M + offs_m)[:, None] * D + offs_d[None, :], out.to(OUT.dtype.element_ty),
                     mask=in_m[:, None])
            q = tl.load(Q + (row * M + offs_m)[:, None] * D + offs_d[None, :], mask=in_m[:, None], other=0.0)
            for start_n in range(0, N, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                in_n = offs_n < N
                k = tl.load(K + (row * N + offs_n)[:, None] * D + offs_d[None, :], mask=in_n[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * QK_SCALE
                s += _key_bias(BIAS, VALID, row, offs_n, N)[None, :]
                p = tl.where(in_m[:, None], tl.exp2(s - lse[:, None]), 0.0)
                total = tl.load(MASS + row * N + offs_n, mask=in_n, other=0.0) + tl.sum(p, 0)
                tl.store(MASS + row * N + offs_n, total, mask=in_n)
            tl.debug_barrier()  # this block's sums are stored before the next block reads them

    @triton.jit
    def score_decay_kernel(
        HOT_SCORE, HOT_LEN, MASS, RET_VALID,  # [B,L,H,Ns] f32, [B,L] i64, [B,L,H,Ns+T+M] f32, [B,L,H,T] bool
        H, NS, T, M,  # int32 extra args
        SCORE,  # [B,L,H,Ns+M] f32
        GAMMA: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # (b * L + l) * H + h
        n = tl.load(HOT_LEN + row // H).to(tl.int32)
        live = n + M  # hot keys: retrieved keys are not counted (StacCache.absorb)
        # absorb(): score = mass * (live keys / queries), old scores decayed by gamma
        factor = live.to(tl.float32) / M.to(tl.float32)
        width = NS + T + M
        for start in range(0, NS, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            in_ns = offs < NS
            old = tl.load(HOT_SCORE + row * NS + offs, mask=in_ns, other=0.0)
            m = tl.load(MASS + row * width + offs, mask=in_ns, other=0.0)
            tl.store(SCORE + row * (NS + M) + offs, tl.where(offs < n, old * GAMMA + m * factor, 0.0), mask=in_ns)
        for start in range(0, M, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = tl.load(MASS + row * width + NS + T + offs, mask=offs < M, other=0.0)
            tl.store(SCORE + row * (NS + M) + NS + offs, m * factor, mask=offs < M)
