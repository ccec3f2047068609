"""The voxel pool's insert as one kernel (OpenAI Triton; CUDA, or Triton's CPU interpreter).

In the stress geometry a step files ~1.6 M evicted tokens (24 layers x 16 heads x 4 frames of
tokens) in up to 4 rounds. In torch ops an insert is ~250 small kernels, each 10-40 us of host
time to launch, plus data-dependent sizes read back per round: host-bound (H100, round 4: 29.6 ms
wall for 11.4 ms of GPU work). ``insert_rows`` runs every round of every touched pool row in one
launch, one program per row (rows never interact), and reads nothing back:

* merge stage: each pending token's nearest pivot (cosine to the pivots as of the round's start),
  the merge of the tokens at ``cos >= merge_cos`` with weight ``exp(cos)``, accumulated in token
  order (deterministic, unlike ``index_add_``'s atomics), the pivot update, and the score gate of
  the tokens that did not merge against the row's mean after the merges;
* buffer fill: the best candidates (score, then arrival) take the free buffer slots, found by
  repeated maxima of one int64 key per token; the rest stay pending for the next round;
* collapse: a full buffer becomes one pivot, first merging the row's weakest pivot into its most
  similar sibling when all its slots are used.

The row's pivots and buffer live in registers between stages, rounded to the pool dtype wherever
the round-by-round torch path stores them. It follows the eager arithmetic in float32 (normalise
by ``max(norm, eps)``, clamp cosines to [-1, 1], first extremum on ties), so with a float32 pool an
insert gives the same decisions, counters and values to float32 rounding (tests/test_kernels.py
-k pool); the eager path (``VoxelPool._round``) stays the CPU implementation and the reference.
``STAC_POOL_KERNELS=0`` turns the kernel off.
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

    @triton.jit
    def _nearest_of_block(k, pn, used, eps, BLOCK_P: tl.constexpr):
        """[BT, D] keys against [BLOCK_P, D] unit pivots: best cosine (-inf: no used pivot) and
        its slot (first maximum on ties, as torch.max)."""
        kn = k / tl.maximum(tl.sqrt(tl.sum(k * k, axis=1)), eps)[:, None]
        cos = tl.sum(kn[:, None, :] * pn[None, :, :], axis=2)  # [BT, BLOCK_P]
        cos = tl.minimum(tl.maximum(cos, -1.0), 1.0)
        cos = tl.where(used[None, :], cos, float("-inf"))
        best = tl.max(cos, axis=1)
        p = tl.arange(0, BLOCK_P)
        slot = tl.min(tl.where(cos == best[:, None], p[None, :], BLOCK_P), axis=1)
        return best, slot

    @triton.jit
    def _row_pivot_offsets(row, D: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr, BLOCK_P: tl.constexpr):
        """Flat slot indices of a row's pivots, the feature offsets, and the [P] / [P, D] masks."""
        d = tl.arange(0, BLOCK_D)
        p = tl.arange(0, BLOCK_P)
        pm = p < P
        return row * P + p, d, pm, pm[:, None] & (d[None, :] < D)

    @triton.jit
    def _load_row_pivots(PK, PV, PW, PS, PC, row, D: tl.constexpr, BLOCK_D: tl.constexpr,
                         P: tl.constexpr, BLOCK_P: tl.constexpr):
        """A pool row's pivots in float32: K, V [BLOCK_P, BLOCK_D] and W, S, C [BLOCK_P] (padding 0)."""
        ix, d, pm, pm2 = _row_pivot_offsets(row, D, BLOCK_D, P, BLOCK_P)
        pk = tl.load(PK + ix[:, None] * D + d[None, :], mask=pm2, other=0.0).to(tl.float32)
        pv = tl.load(PV + ix[:, None] * D + d[None, :], mask=pm2, other=0.0).to(tl.float32)
        pw = tl.load(PW + ix, mask=pm, other=0.0)
        ps = tl.load(PS + ix, mask=pm, other=0.0)
        pc = tl.load(PC + ix, mask=pm, other=0.0)
        return pk, pv, pw, ps, pc

    @triton.jit
    def _store_row_pivots(PK, PV, PW, PS, PC, row, pk, pv, pw, ps, pc, D: tl.constexpr, BLOCK_D: tl.constexpr,
                          P: tl.constexpr, BLOCK_P: tl.constexpr):
        """Write a row's pivots back (K and V in the pool's dtype), every slot once."""
        ix, d, pm, pm2 = _row_pivot_offsets(row, D, BLOCK_D, P, BLOCK_P)
        tl.store(PK + ix[:, None] * D + d[None, :], pk.to(PK.dtype.element_ty), mask=pm2)
        tl.store(PV + ix[:, None] * D + d[None, :], pv.to(PV.dtype.element_ty), mask=pm2)
        tl.store(PW + ix, pw, mask=pm)
        tl.store(PS + ix, ps, mask=pm)
        tl.store(PC + ix, pc, mask=pm)

    @triton.jit
    def _token_block(K, SRC, POS, S, b, end, stride_k, D: tl.constexpr, BLOCK_D: tl.constexpr, BT: tl.constexpr):
        """Tokens b .. b+BT of a row's run (positions below ``end`` live): their index, liveness,
        key row, score and float32 key [BT, BLOCK_D]."""
        t = b + tl.arange(0, BT)
        live = t < end
        pos = tl.load(POS + t, mask=live, other=0)
        src = tl.load(SRC + pos, mask=live, other=0)
        s = tl.load(S + pos, mask=live, other=0.0)
        d = tl.arange(0, BLOCK_D)
        k = tl.load(K + src[:, None] * stride_k + d[None, :], mask=live[:, None] & (d[None, :] < D), other=0.0)
        return t, live, src, s, k.to(tl.float32)

    @triton.jit
    def _order_key(s, pos):
        """int64 key ordering tokens by score (descending) then position (ascending) as one max:
        the float's bits made order-preserving in the high half, the inverted position below."""
        b = (s + 0.0).to(tl.int32, bitcast=True)  # + 0.0: -0.0 and +0.0 tie, as in a sort
        b = tl.where(b < 0, b ^ 0x7FFFFFFF, b)
        return (b.to(tl.int64) + 2147483648) * 2147483648 + (2147483647 - pos.to(tl.int64))

    @triton.jit
    def _collapse_buffer(bk, bv, bs, pk, pv, pw, ps, pc, eps, B: tl.constexpr, BLOCK_B: tl.constexpr,
                         P: tl.constexpr, BLOCK_P: tl.constexpr):
        """A full buffer (in registers, float32) -> one pivot; returns the row's new pivots.

        Seed = highest score (first on ties), a_i = exp(cos(k_i, seed)); a row whose P slots are
        all used first merges its lowest-W pivot (first on ties) into its most similar sibling,
        the victim's weight discounted by exp(cos - 1), and the new pivot takes the freed slot."""
        b = tl.arange(0, BLOCK_B)
        bm = b < B
        bs_m = tl.where(bm, bs, float("-inf"))
        top = tl.max(bs_m, axis=0)
        seed = tl.min(tl.where(bs_m == top, b, BLOCK_B), axis=0)
        kn = bk / tl.maximum(tl.sqrt(tl.sum(bk * bk, axis=1)), eps)[:, None]
        k_seed = tl.sum(tl.where((b == seed)[:, None], kn, 0.0), axis=0)
        cos = tl.minimum(tl.maximum(tl.sum(kn * k_seed[None, :], axis=1), -1.0), 1.0)
        a = tl.where(bm, tl.exp(cos), 0.0)
        w = tl.sum(a, axis=0)
        k_new = tl.sum(a[:, None] * bk, axis=0) / w
        v_new = tl.sum(a[:, None] * bv, axis=0) / w
        s_new = tl.sum(tl.where(bm, bs, 0.0), axis=0)

        p = tl.arange(0, BLOCK_P)
        pm = p < P
        used = pm & (pc > 0)
        full = tl.sum(used.to(tl.int32), axis=0) == P
        free = tl.min(tl.where(pm & ~used, p, BLOCK_P), axis=0)  # first free slot
        pw_min = tl.min(tl.where(pm, pw, float("inf")), axis=0)
        victim = tl.min(tl.where(pm & (pw == pw_min), p, BLOCK_P), axis=0)
        pn = pk / tl.maximum(tl.sqrt(tl.sum(pk * pk, axis=1)), eps)[:, None]
        is_v = p == victim
        k_v = tl.sum(tl.where(is_v[:, None], pk, 0.0), axis=0)
        v_v = tl.sum(tl.where(is_v[:, None], pv, 0.0), axis=0)
        n_v = tl.sum(tl.where(is_v[:, None], pn, 0.0), axis=0)
        sim = tl.minimum(tl.maximum(tl.sum(pn * n_v[None, :], axis=1), -1.0), 1.0)
        sim = tl.where(pm & ~is_v, sim, float("-inf"))
        sim_best = tl.max(sim, axis=0)
        nb = tl.min(tl.where(sim == sim_best, p, BLOCK_P), axis=0)
        is_n = (p == nb) & ~is_v & full  # with one pivot per row there is no sibling to merge into
        w_v = tl.sum(tl.where(is_v, pw, 0.0), axis=0) * tl.exp(sim_best - 1.0)
        w_n = tl.sum(tl.where(p == nb, pw, 0.0), axis=0)
        w_m = w_v + w_n
        w_m = tl.where(w_m > 0, w_m, 1.0)  # (only rows that merge use it; keeps the others finite)
        k_n = tl.sum(tl.where((p == nb)[:, None], pk, 0.0), axis=0)
        v_n = tl.sum(tl.where((p == nb)[:, None], pv, 0.0), axis=0)
        k_m = (w_v * k_v + w_n * k_n) / w_m
        v_m = (w_v * v_v + w_n * v_n) / w_m
        s_m = tl.sum(tl.where(is_v | (p == nb), ps, 0.0), axis=0)
        c_m = tl.sum(tl.where(is_v | (p == nb), pc, 0.0), axis=0)

        is_s = p == tl.where(full, victim, free)
        pk = tl.where(is_s[:, None], k_new[None, :], tl.where(is_n[:, None], k_m[None, :], pk))
        pv = tl.where(is_s[:, None], v_new[None, :], tl.where(is_n[:, None], v_m[None, :], pv))
        pw = tl.where(is_s, w, tl.where(is_n, w_m, pw))
        ps = tl.where(is_s, s_new, tl.where(is_n, s_m, ps))
        pc = tl.where(is_s, float(B), tl.where(is_n, c_m, pc))
        return pk, pv, pw, ps, pc

    @triton.jit
    def _insert_rows(K, V, SRC, G, S, BOUNDS, PEND, CAND, PK, PV, PW, PS, PC, BK, BV, BS, BN, COUNTS,
                     stride_k, stride_v, merge_cos, score_gate, eps, MAX_ROUNDS,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr, BLOCK_P: tl.constexpr,
                     B: tl.constexpr, BLOCK_B: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr,
                     GATE: tl.constexpr):
        # One program per segment = the tokens of one pool row (contiguous: sorted by row), all
        # rounds of the insert. The row's pivots and buffer stay in registers (rounded to the
        # pool dtype wherever the round-by-round path stores them); the row's pending tokens
        # (PEND) and buffer candidates (CAND) are position lists compacted in its own range.
        # Loops that need keys take BT tokens at a time, those over scores only BF.
        seg = tl.program_id(0)
        start = tl.load(BOUNDS + seg)
        end = tl.load(BOUNDS + seg + 1)
        row = tl.load(G + start)
        d = tl.arange(0, BLOCK_D)
        p = tl.arange(0, BLOCK_P)
        bb = tl.arange(0, BLOCK_B)
        dm = d < D
        bm2 = (bb < B)[:, None] & dm[None, :]
        pk, pv, pw, ps, pc = _load_row_pivots(PK, PV, PW, PS, PC, row, D, BLOCK_D, P, BLOCK_P)
        buf_ix = row * B + bb
        bk = tl.load(BK + buf_ix[:, None] * D + d[None, :], mask=bm2, other=0.0).to(tl.float32)
        bv = tl.load(BV + buf_ix[:, None] * D + d[None, :], mask=bm2, other=0.0).to(tl.float32)
        bs = tl.load(BS + buf_ix, mask=bb < B, other=0.0)
        bn = tl.load(BN + row)

        count = (end - start).to(tl.int32)  # pending tokens: PEND[start : start + count], ascending positions
        n_merged = count * 0
        n_gated = count * 0
        n_collapsed = count * 0
        rounds = count * 0
        for _r in range(MAX_ROUNDS):
            if count > 0:
                rounds += 1
                # ---- merge stage: nearest pivot as of the round's start, merges in token order
                used = pc > 0
                pn = pk / tl.maximum(tl.sqrt(tl.sum(pk * pk, axis=1)), eps)[:, None]
                acc_k = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
                acc_v = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
                asum = tl.zeros([BLOCK_P], tl.float32)
                ssum = tl.zeros([BLOCK_P], tl.float32)
                csum = tl.zeros([BLOCK_P], tl.float32)
                for b in range(start, start + count, BT):
                    t, live, src, s, k = _token_block(K, SRC, PEND, S, b, start + count, stride_k, D, BLOCK_D, BT)
                    best, slot = _nearest_of_block(k, pn, used, eps, BLOCK_P)
                    merge = live & (best >= merge_cos)
                    hit = (slot[:, None] == p[None, :]) & merge[:, None]  # [BT, BLOCK_P]
                    wgt = tl.where(hit, tl.exp(best)[:, None], 0.0)
                    m2 = merge[:, None] & dm[None, :]
                    v = tl.load(V + src[:, None] * stride_v + d[None, :], mask=m2, other=0.0).to(tl.float32)
                    acc_k += tl.sum(wgt[:, :, None] * k[:, None, :], axis=0)
                    acc_v += tl.sum(wgt[:, :, None] * v[:, None, :], axis=0)
                    asum += tl.sum(wgt, axis=0)
                    ssum += tl.sum(tl.where(hit, s[:, None], 0.0), axis=0)
                    csum += tl.sum(hit.to(tl.float32), axis=0)
                # K <- (W K + sum a k) / (W + sum a), V likewise; W, S, C add
                upd = csum > 0
                w_new = pw + asum
                denom = tl.where(upd, w_new, 1.0)[:, None]
                pk_m = tl.where(upd[:, None], (pw[:, None] * pk + acc_k) / denom, pk)
                pv_m = tl.where(upd[:, None], (pw[:, None] * pv + acc_v) / denom, pv)
                pk_m = pk_m.to(PK.dtype.element_ty).to(tl.float32)
                pv_m = pv_m.to(PV.dtype.element_ty).to(tl.float32)
                pw_m = tl.where(upd, w_new, pw)
                ps_m = ps + ssum
                pc_m = pc + csum

                # ---- outcomes: merged, gated (a non-merging token of a row with a pivot whose
                # score is not above score_gate x the row's mean per merged token after the
                # merges), or buffer candidate -> CAND (ascending). The merge decision is
                # recomputed against the round-start pivots still in registers.
                row_mean = tl.sum(ps_m, axis=0) / tl.maximum(tl.sum(pc_m, axis=0), eps)
                # (a [BT] vector: Triton's interpreter mis-types vector & scalar-bool)
                has_pivot = (tl.zeros([BT], tl.int32) + tl.sum(used.to(tl.int32), axis=0)) > 0
                n_cand = count * 0
                for b in range(start, start + count, BT):
                    t, live, src, s, k = _token_block(K, SRC, PEND, S, b, start + count, stride_k, D, BLOCK_D, BT)
                    best, slot = _nearest_of_block(k, pn, used, eps, BLOCK_P)
                    merge = live & (best >= merge_cos)
                    cand = live & ~merge
                    if GATE:
                        gated = cand & has_pivot & ~(s > score_gate * row_mean)
                        n_gated += tl.sum(gated.to(tl.int32), axis=0)
                        cand = cand & ~gated
                    n_merged += tl.sum(merge.to(tl.int32), axis=0)
                    pos = tl.load(PEND + t, mask=live, other=0)
                    at = start + n_cand + tl.cumsum(cand.to(tl.int32), axis=0) - 1
                    tl.store(CAND + at, pos, mask=cand)
                    n_cand += tl.sum(cand.to(tl.int32), axis=0)
                pk, pv, pw, ps, pc = pk_m, pv_m, pw_m, ps_m, pc_m
                tl.debug_barrier()  # CAND is read back by other threads of this program

                # ---- buffer fill: the best (score, then position) candidates take the free slots
                take = tl.minimum(B - bn, n_cand)
                last = tl.full([], 9223372036854775807, tl.int64)
                for j in range(B):
                    if j < take:
                        top = tl.full([], -1, tl.int64)
                        for b in range(start, start + n_cand, BF):
                            t = b + tl.arange(0, BF)
                            live = t < start + n_cand
                            pos = tl.load(CAND + t, mask=live, other=0)
                            key = _order_key(tl.load(S + pos, mask=live, other=0.0), pos)
                            top = tl.maximum(top, tl.max(tl.where(live & (key < last), key, -1), axis=0))
                        last = top
                        pos = 2147483647 - (top % 2147483648)
                        src = tl.load(SRC + pos)
                        at = bb == bn + j
                        kt = tl.load(K + src * stride_k + d, mask=dm, other=0.0).to(PK.dtype.element_ty)
                        vt = tl.load(V + src * stride_v + d, mask=dm, other=0.0).to(PV.dtype.element_ty)
                        bk = tl.where(at[:, None], kt.to(tl.float32)[None, :], bk)
                        bv = tl.where(at[:, None], vt.to(tl.float32)[None, :], bv)
                        bs = tl.where(at, tl.load(S + pos), bs)
                bn += take
                # ---- the candidates that did not fit stay pending (ascending) for the next round
                left = count * 0
                if take < n_cand:
                    for b in range(start, start + n_cand, BF):
                        t = b + tl.arange(0, BF)
                        live = t < start + n_cand
                        pos = tl.load(CAND + t, mask=live, other=0)
                        stay = live & (_order_key(tl.load(S + pos, mask=live, other=0.0), pos) < last)
                        at = start + left + tl.cumsum(stay.to(tl.int32), axis=0) - 1
                        tl.store(PEND + at, pos, mask=stay)
                        left += tl.sum(stay.to(tl.int32), axis=0)
                count = left
                tl.debug_barrier()  # PEND is read back by other threads of this program
                # ---- a full buffer becomes a pivot
                if bn == B:
                    pk, pv, pw, ps, pc = _collapse_buffer(bk, bv, bs, pk, pv, pw, ps, pc, eps, B, BLOCK_B, P, BLOCK_P)
                    pk = pk.to(PK.dtype.element_ty).to(tl.float32)
                    pv = pv.to(PV.dtype.element_ty).to(tl.float32)
                    bn = bn * 0
                    n_collapsed += 1

        _store_row_pivots(PK, PV, PW, PS, PC, row, pk, pv, pw, ps, pc, D, BLOCK_D, P, BLOCK_P)
        tl.store(BK + buf_ix[:, None] * D + d[None, :], bk.to(BK.dtype.element_ty), mask=bm2)
        tl.store(BV + buf_ix[:, None] * D + d[None, :], bv.to(BV.dtype.element_ty), mask=bm2)
        tl.store(BS + buf_ix, bs, mask=bb < B)
        tl.store(BN + row, bn)
        # merged, gated, pivots created, left over after MAX_ROUNDS (overflow), rounds run
        c = tl.arange(0, 8)
        out = tl.where(c == 0, n_merged, tl.where(c == 1, n_gated, tl.where(c == 2, n_collapsed,
                       tl.where(c == 3, count, rounds))))
        tl.store(COUNTS + seg * 5 + c, out.to(tl.int64), mask=c < 5)


# insert_rows' launch: tokens per iteration of the loops that read keys (BT), warps per program
# (one program per pool row), and tokens per iteration of the loops over scores only (BF). A
# row's rounds are serial, so an insert takes as long as its busiest row. Rows of a few tokens
# run best as small latency-bound programs (H200, vggt-1b: the stress insert of ~23 tokens per
# row took 3.7 ms with 8 x 1 warp, 5.7 with 16 x 2, 6.1 with 32 x 4); for long rows (few voxels)
# the launch stays at round 6's merge kernel's 16 x 2, fewer serial iterations per row, not
# measured against others. Picked from the mean tokens per row; None = automatic, set to tune.
_SEGMENT_BLOCK: int | None = None
_INSERT_WARPS: int | None = None
_SCORE_BLOCK = 128
_SMALL_ROWS = 64  # mean tokens per row up to which the small launch is used


def _launch_config(tokens: int, rows: int) -> tuple[int, int]:
    if _SEGMENT_BLOCK is not None and _INSERT_WARPS is not None:
        return _SEGMENT_BLOCK, _INSERT_WARPS
    return (8, 1) if tokens <= _SMALL_ROWS * rows else (16, 2)


INSERT_COUNTERS = ("merged", "gated", "pivots_created", "overflow_dropped", "rounds")


def insert_rows(k: Tensor, v: Tensor, src: Tensor, g: Tensor, s: Tensor, piv: dict[str, Tensor],
                buf: dict[str, Tensor], merge_cos: float, score_gate: float, eps: float, max_rounds: int) -> Tensor:
    """A whole insert's rounds, in place on the pool, one program per touched pool row.

    Position ``i`` (0 .. n-1) is a token in (row, arrival) order: ``g`` [n] its flat pool row
    (non-decreasing), ``s`` [n] its float32 score, ``src`` [n] the row of ``k``/``v`` [M, D]
    holding its key and value. ``piv`` holds the flat pivot tensors ``piv_k``/``piv_v``
    [R, P, D] and ``piv_w``/``piv_s``/``piv_c`` [R, P]; ``buf`` the buffers ``buf_k``/``buf_v``
    [R, B, D], ``buf_s`` [R, B] and ``buf_n`` [R] (all contiguous). Returns int64 [5] on the
    device (no host synchronisation): tokens merged, gated, pivots created, tokens left pending
    after ``max_rounds`` rounds, and the most rounds any row ran (``INSERT_COUNTERS``).
    """
    n = g.numel()
    if n == 0:
        return torch.zeros(len(INSERT_COUNTERS), dtype=torch.int64, device=g.device)
    if n >= 2**31:
        raise ValueError(f"insert_rows takes fewer than 2**31 tokens per call, got {n}")
    pk = piv["piv_k"]
    R, P, D = pk.shape
    B = buf["buf_k"].shape[1]
    if k.stride(1) != 1 or v.stride(1) != 1 or not all(t.is_contiguous() for t in (*piv.values(), *buf.values())):
        raise ValueError("insert_rows needs unit-stride key/value rows and contiguous pool tensors")
    first = torch.ones(n, dtype=torch.bool, device=g.device)
    first[1:] = g[1:] != g[:-1]
    starts = first.nonzero().squeeze(1)  # one synchronisation: the number of rows touched
    bounds = torch.cat([starts, starts.new_full((1,), n)])
    pend = torch.arange(n, device=g.device)
    cand = torch.empty_like(pend)
    counts = torch.empty(starts.numel(), len(INSERT_COUNTERS), dtype=torch.int64, device=g.device)
    block, warps = _launch_config(n, starts.numel())
    _insert_rows[(starts.numel(),)](
        k, v, src, g, s, bounds, pend, cand, pk, piv["piv_v"], piv["piv_w"], piv["piv_s"], piv["piv_c"],
        buf["buf_k"], buf["buf_v"], buf["buf_s"], buf["buf_n"], counts,
        k.stride(0), v.stride(0), float(merge_cos), float(score_gate), eps, int(max_rounds),
        D=D, BLOCK_D=triton.next_power_of_2(D), P=P, BLOCK_P=triton.next_power_of_2(P),
        B=B, BLOCK_B=triton.next_power_of_2(B), BT=block, BF=_SCORE_BLOCK, GATE=score_gate > 0,
        num_warps=warps)
    sums = counts[:, :4].sum(dim=0)
    return torch.cat([sums, counts[:, 4].amax().reshape(1)])
