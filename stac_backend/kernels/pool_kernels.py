"""The voxel pool's insert stages as kernels (OpenAI Triton; CUDA, or Triton's CPU interpreter).

In the stress geometry a step files ~1.6 M evicted tokens (24 layers x 16 heads x 4 frames of
tokens) in up to 4 rounds. In torch ops an insert is ~250 small kernels, each 10-40 us of host
time to launch, plus data-dependent sizes read back: on the H100 the insert was host-bound
(29.6 ms wall for 11.4 ms of GPU work, docs/benchmarks/pool_insert_h100_round4*). Two kernels
fold whole stages into one launch each, one program per pool row (rows never interact):

* ``merge_round``: a round's merge stage - each pending token's nearest pivot (cosine to the
  pivots as of the round's start), the merge of the tokens at ``cos >= merge_cos`` into their
  pivots with weight ``exp(cos)``, accumulated in token order (so the result does not depend on
  scheduling, unlike ``index_add_``'s atomics), the pivot update, and the score gate of the tokens
  that did not merge against the row's mean after the merges. Replaces ~35 ops and a ``unique``.
* ``collapse_rows``: full buffers into one pivot each, first merging the row's weakest pivot into
  its most similar sibling when all its slots are used. Replaces ~60 ops.

Both follow the eager arithmetic in float32 (normalise by ``max(norm, eps)``, clamp cosines to
[-1, 1], first extremum on ties), so with a float32 pool an insert gives the same decisions and
values to float32 rounding (tests/test_kernels.py -k pool); the eager path
(``VoxelPool._merge_and_gate``, ``_collapse``) stays the CPU implementation and the reference.
``STAC_POOL_KERNELS=0`` turns the kernels off.
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
    def _merge_round(K, V, SRC, POS, G, S, BOUNDS, PK, PV, PW, PS, PC, STATE,
                     stride_k, stride_v, merge_cos, score_gate, eps,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr, BLOCK_P: tl.constexpr,
                     BT: tl.constexpr, GATE: tl.constexpr):
        # One program per segment = the pending tokens of one pool row (contiguous: sorted by row).
        seg = tl.program_id(0)
        start = tl.load(BOUNDS + seg)
        end = tl.load(BOUNDS + seg + 1)
        row = tl.load(G + tl.load(POS + start))
        d = tl.arange(0, BLOCK_D)
        p = tl.arange(0, BLOCK_P)
        dm = d < D
        pk, pv, pw, ps, pc = _load_row_pivots(PK, PV, PW, PS, PC, row, D, BLOCK_D, P, BLOCK_P)
        used = pc > 0
        pn = pk / tl.maximum(tl.sqrt(tl.sum(pk * pk, axis=1)), eps)[:, None]

        # Pass 1: accumulate the merging tokens per pivot, in token order.
        acc_k = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
        acc_v = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
        asum = tl.zeros([BLOCK_P], tl.float32)
        ssum = tl.zeros([BLOCK_P], tl.float32)
        csum = tl.zeros([BLOCK_P], tl.float32)
        for b in range(start, end, BT):
            t, live, src, s, k = _token_block(K, SRC, POS, S, b, end, stride_k, D, BLOCK_D, BT)
            m2 = live[:, None] & dm[None, :]
            best, slot = _nearest_of_block(k, pn, used, eps, BLOCK_P)
            merge = live & (best >= merge_cos)
            hit = (slot[:, None] == p[None, :]) & merge[:, None]  # [BT, BLOCK_P]
            wgt = tl.where(hit, tl.exp(best)[:, None], 0.0)
            v = tl.load(V + src[:, None] * stride_v + d[None, :], mask=m2 & merge[:, None], other=0.0).to(tl.float32)
            acc_k += tl.sum(wgt[:, :, None] * k[:, None, :], axis=0)
            acc_v += tl.sum(wgt[:, :, None] * v[:, None, :], axis=0)
            asum += tl.sum(wgt, axis=0)
            ssum += tl.sum(tl.where(hit, s[:, None], 0.0), axis=0)
            csum += tl.sum(hit.to(tl.float32), axis=0)

        # The pivot update: K <- (W K + sum a k) / (W + sum a), V likewise; W, S, C add.
        upd = csum > 0
        w_new = pw + asum
        denom = tl.where(upd, w_new, 1.0)[:, None]
        pk_new = tl.where(upd[:, None], (pw[:, None] * pk + acc_k) / denom, pk)
        pv_new = tl.where(upd[:, None], (pw[:, None] * pv + acc_v) / denom, pv)
        _store_row_pivots(PK, PV, PW, PS, PC, row, pk_new, pv_new, tl.where(upd, w_new, pw), ps + ssum, pc + csum,
                          D, BLOCK_D, P, BLOCK_P)

        # Pass 2: every token's outcome, 0 merged, 1 buffer candidate, 2 gated (dropped): a
        # non-merging token of a row with a pivot is kept only if its score beats score_gate x
        # the row's mean score per merged token after this round's merges. The merge decision is
        # recomputed (the pivots as of the round's start are still in registers): cheaper than
        # publishing it between the passes.
        row_mean = tl.sum(ps + ssum, axis=0) / tl.maximum(tl.sum(pc + csum, axis=0), eps)
        has_pivot = tl.sum(used.to(tl.int32), axis=0) > 0
        for b in range(start, end, BT):
            t, live, src, s, k = _token_block(K, SRC, POS, S, b, end, stride_k, D, BLOCK_D, BT)
            best, slot = _nearest_of_block(k, pn, used, eps, BLOCK_P)
            merge = best >= merge_cos
            state = tl.where(merge, 0, 1)
            if GATE:
                gated = (~merge) & has_pivot & ~(s > score_gate * row_mean)
                state = tl.where(gated, 2, state)
            tl.store(STATE + t, state.to(tl.int8), mask=live)

    @triton.jit
    def _collapse_rows(ROWS, BK, BV, BS, BN, PK, PV, PW, PS, PC, eps,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, B: tl.constexpr, BLOCK_B: tl.constexpr,
                       P: tl.constexpr, BLOCK_P: tl.constexpr):
        row = tl.load(ROWS + tl.program_id(0))
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        # The full buffer -> one pivot: seed = highest score (first on ties), a_i = exp(cos(k_i, seed)).
        b = tl.arange(0, BLOCK_B)
        bm = b < B
        bm2 = bm[:, None] & dm[None, :]
        buf_ix = row * B + b
        bk = tl.load(BK + buf_ix[:, None] * D + d[None, :], mask=bm2, other=0.0).to(tl.float32)
        bv = tl.load(BV + buf_ix[:, None] * D + d[None, :], mask=bm2, other=0.0).to(tl.float32)
        bs = tl.load(BS + buf_ix, mask=bm, other=float("-inf"))
        top = tl.max(bs, axis=0)
        seed = tl.min(tl.where(bs == top, b, BLOCK_B), axis=0)
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
        pk, pv, pw, ps, pc = _load_row_pivots(PK, PV, PW, PS, PC, row, D, BLOCK_D, P, BLOCK_P)
        used = pm & (pc > 0)
        full = tl.sum(used.to(tl.int32), axis=0) == P
        free = tl.min(tl.where(pm & ~used, p, BLOCK_P), axis=0)  # first free slot

        # A full row first merges its lowest-W pivot (first on ties) into its most similar
        # sibling, the victim's weight discounted by exp(cos - 1); the new pivot takes its slot.
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

        slot = tl.where(full, victim, free)
        is_s = p == slot
        # Every slot's final value, stored once (no two stores to one address).
        _store_row_pivots(PK, PV, PW, PS, PC, row,
                          tl.where(is_s[:, None], k_new[None, :], tl.where(is_n[:, None], k_m[None, :], pk)),
                          tl.where(is_s[:, None], v_new[None, :], tl.where(is_n[:, None], v_m[None, :], pv)),
                          tl.where(is_s, w, tl.where(is_n, w_m, pw)),
                          tl.where(is_s, s_new, tl.where(is_n, s_m, ps)),
                          tl.where(is_s, float(B), tl.where(is_n, c_m, pc)),
                          D, BLOCK_D, P, BLOCK_P)
        tl.store(BN + row, 0)


_SEGMENT_BLOCK = 16  # tokens per iteration of merge_round's loop over a row
_MERGE_ROUND_WARPS = 2  # warps per merge_round program (one program per pool row)


def merge_round(k: Tensor, v: Tensor, src: Tensor, pending: Tensor, g: Tensor, s: Tensor,
                piv: dict[str, Tensor], merge_cos: float, score_gate: float, eps: float) -> Tensor:
    """One insert round's merge stage for the ``pending`` positions, in place on the pivots.

    Positions index ``g`` (flat pool row, non-decreasing in position), ``s`` (float32 score) and
    ``src`` (row of ``k``/``v`` holding the token); ``pending`` is ascending, so each pool row's
    tokens are one contiguous run. ``piv`` holds the flat pivot tensors ``piv_k``/``piv_v``
    [R, P, D] and ``piv_w``/``piv_s``/``piv_c`` [R, P] (contiguous). Returns int8 [n]: 0 merged,
    1 buffer candidate, 2 dropped by the score gate (only with ``score_gate > 0``).
    """
    n = pending.numel()
    state = torch.empty(n, dtype=torch.int8, device=k.device)
    if n == 0:
        return state
    pk = piv["piv_k"]
    R, P, D = pk.shape
    if k.stride(1) != 1 or v.stride(1) != 1 or not all(t.is_contiguous() for t in piv.values()):
        raise ValueError("merge_round needs unit-stride key/value rows and contiguous pivot tensors")
    gp = g[pending]
    first = torch.ones(n, dtype=torch.bool, device=k.device)
    first[1:] = gp[1:] != gp[:-1]
    starts = first.nonzero().squeeze(1)  # one synchronisation: the number of rows touched
    bounds = torch.cat([starts, starts.new_full((1,), n)])
    _merge_round[(starts.numel(),)](
        k, v, src, pending, g, s, bounds, pk, piv["piv_v"], piv["piv_w"], piv["piv_s"], piv["piv_c"], state,
        k.stride(0), v.stride(0), float(merge_cos), float(score_gate), eps,
        D=D, BLOCK_D=triton.next_power_of_2(D), P=P, BLOCK_P=triton.next_power_of_2(P),
        BT=_SEGMENT_BLOCK, GATE=score_gate > 0, num_warps=_MERGE_ROUND_WARPS)
    return state


def collapse_rows(rows: Tensor, buf: dict[str, Tensor], piv: dict[str, Tensor], eps: float) -> None:
    """Collapse the full buffers of the flat pool ``rows`` (distinct) into one pivot each, in place.

    ``buf`` holds ``buf_k``/``buf_v`` [R, B, D], ``buf_s`` [R, B] and ``buf_n`` [R]; ``piv`` the
    flat pivot tensors as in ``merge_round``. A row whose pivot slots are all used first merges
    its lowest-W pivot into its most similar sibling and reuses that slot.
    """
    n = rows.numel()
    if n == 0:
        return
    R, B, D = buf["buf_k"].shape
    P = piv["piv_k"].shape[1]
    if not all(t.is_contiguous() for t in (*buf.values(), *piv.values())):
        raise ValueError("collapse_rows needs contiguous pool tensors")
    _collapse_rows[(n,)](rows.contiguous(), buf["buf_k"], buf["buf_v"], buf["buf_s"], buf["buf_n"],
                         piv["piv_k"], piv["piv_v"], piv["piv_w"], piv["piv_s"], piv["piv_c"], eps,
                         D=D, BLOCK_D=triton.next_power_of_2(D), B=B, BLOCK_B=triton.next_power_of_2(B),
                         P=P, BLOCK_P=triton.next_power_of_2(P))
