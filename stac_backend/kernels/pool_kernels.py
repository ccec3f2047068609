"""The voxel pool's insert as one kernel (OpenAI Triton; CUDA, or Triton's CPU interpreter).

In the stress geometry a step files ~1.6 M evicted tokens (24 layers x 16 heads x 4 frames of
tokens). In torch ops an insert is ~100 small kernels, each 10-40 us of host time to launch, plus
data-dependent sizes read back: host-bound. ``insert_rows`` runs the whole insert of every touched
pool row (rows with new tokens or with tokens carried over from the previous insert) in one
launch, one program per row (rows never interact), and reads back only the number of rows:

* merge stage: each token's nearest pivot (cosine to the pivots as of the call's start), the
  merge of the tokens at ``cos >= merge_cos`` with weight ``exp(cos)``, accumulated in token
  order (new tokens, then carried ones; deterministic, unlike ``index_add_``'s atomics), the
  pivot update, and the score gate of the tokens that did not merge against the row's mean after
  the merges;
* buffer: the row's buffered tokens and its candidates ranked by score (buffered, new, carried
  on ties) through one int64 key per entry; the first ``B`` are the buffer, the next ``C`` are
  carried over, the rest dropped. The merge decisions of the first pass are kept in a byte per
  token, so the second pass reads scores only. Two ways to rank, picked per launch from the mean
  tokens per row (both give the same slots):

  - rounds (rows of a few tokens, e.g. 2 mm voxels: ~20 tokens per row, up to ~86 k rows): the new
    candidates are compacted, then ``B + C`` rounds (no more than there are entries) each take
    the largest key below the previous one and place that entry; the buffer and carry are built
    in registers and stored once. Each round is a few cheap maxima over a row's few candidates;
  - counts (long rows, e.g. 5 cm voxels: ~1,000 tokens per row): a running top ``B + C`` of the
    new candidates, each block of scores merged in by counting larger keys; the rank of every
    kept entry among buffered, top new and carried ones is its slot, written straight there.
    Its cost per block is fixed (block x block and block x (B + C) key comparisons), which pays
    off over many blocks but dominates a row of ~20 tokens, where rounds over the compacted
    candidates are cheaper; with ~1,000 candidates per row, rounds would rescan them all
    ``B + C`` times;
* collapse: a full buffer becomes one pivot, first merging the row's weakest pivot into its most
  similar sibling when all its slots are used.

The row's pivots and carried tokens live in registers between stages, rounded to the pool
dtype wherever the torch path stores them. It follows the eager arithmetic in float32 (normalise
by ``max(norm, eps)``, clamp cosines to [-1, 1], first extremum on ties), so with a float32 pool an
insert gives the same decisions, counters and values to float32 rounding (tests/gpu/test_kernels.py
-k pool); the eager path (``VoxelPool.insert`` without the kernel) stays the CPU implementation.
``STAC_POOL_KERNELS=0`` turns the kernel off. (One module over ~500 lines: the kernel's stages
share its row's registers, so they stay together with their two rankings and the launch.)
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
    def _token_block(K, SRC, S, b, end, stride_k, D: tl.constexpr, BLOCK_D: tl.constexpr, BT: tl.constexpr):
        """Positions b .. b+BT of a row's run (those below ``end`` live): the positions, liveness,
        key row, score and float32 key [BT, BLOCK_D]."""
        t = b + tl.arange(0, BT)
        live = t < end
        src = tl.load(SRC + t, mask=live, other=0)
        s = tl.load(S + t, mask=live, other=0.0)
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
    def _merge_sums(k, v, s, best, slot, merge, p, acc_k, acc_v, asum, ssum, csum):
        """Add the tokens that merge (weight exp(cos)) to their nearest pivot's sums."""
        hit = (slot[:, None] == p[None, :]) & merge[:, None]  # [BT, BLOCK_P]
        wgt = tl.where(hit, tl.exp(best)[:, None], 0.0)
        acc_k += tl.sum(wgt[:, :, None] * k[:, None, :], axis=0)
        acc_v += tl.sum(wgt[:, :, None] * v[:, None, :], axis=0)
        asum += tl.sum(wgt, axis=0)
        ssum += tl.sum(tl.where(hit, s[:, None], 0.0), axis=0)
        csum += tl.sum(hit.to(tl.float32), axis=0)
        return acc_k, acc_v, asum, ssum, csum

    @triton.jit
    def _count_above(x, y):
        """For each key of x, how many keys of y are larger (valid keys are distinct; -1 = empty)."""
        return tl.sum((y[None, :] > x[:, None]).to(tl.int32), axis=1)

    @triton.jit
    def _key_of_rank(keys, rank, slots):
        """For each slot r, the valid key (>= 0) whose rank is r, else -1."""
        hit = (rank[None, :] == slots[:, None]) & (keys[None, :] >= 0)
        return tl.max(tl.where(hit, keys[None, :], -1), axis=1)

    @triton.jit
    def _store_ranked(BK, BV, BS, CK, CV, CS, row, rank, keep, k, v, s, d, dm,
                      D: tl.constexpr, B: tl.constexpr, C: tl.constexpr):
        """Entries (float32 K, V [N, BLOCK_D], S [N]) to their slots: rank r < B -> buffer slot r,
        B <= r < B + C -> carry slot r - B, for the entries ``keep`` marks."""
        to_b = keep & (rank < B)
        to_c = keep & (rank >= B) & (rank < B + C)
        at_b = row * B + tl.where(to_b, rank, 0)
        at_c = row * C + tl.where(to_c, rank - B, 0)
        mb = to_b[:, None] & dm[None, :]
        mc = to_c[:, None] & dm[None, :]
        tl.store(BK + at_b[:, None] * D + d[None, :], k.to(BK.dtype.element_ty), mask=mb)
        tl.store(BV + at_b[:, None] * D + d[None, :], v.to(BV.dtype.element_ty), mask=mb)
        tl.store(BS + at_b, s, mask=to_b)
        tl.store(CK + at_c[:, None] * D + d[None, :], k.to(CK.dtype.element_ty), mask=mc)
        tl.store(CV + at_c[:, None] * D + d[None, :], v.to(CV.dtype.element_ty), mask=mc)
        tl.store(CS + at_c, s, mask=to_c)

    @triton.jit
    def _ranked_by_rounds(K, V, SRC, S, CAND, PK, PV, start, n_new, n_tok, total, b_key, c_key,
                          bk, bv, bs, ck, cv, cs, stride_k, stride_v, D: tl.constexpr, BLOCK_D: tl.constexpr,
                          B: tl.constexpr, BLOCK_B: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr,
                          BF: tl.constexpr):
        """The row's new buffer and carry (float32 K, V, S tiles, zero past the entries) from its
        buffered entries, its new candidates (positions compacted in CAND[start : start + n_new])
        and its carried candidates: round j takes the largest key below round j-1's and places
        that entry in slot j (buffer slots, then carry slots)."""
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        bb = tl.arange(0, BLOCK_B)
        cc = tl.arange(0, BLOCK_C)
        c_seq = B + n_tok + cc
        nbk = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
        nbv = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
        nbs = tl.zeros([BLOCK_B], tl.float32)
        nck = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
        ncv = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
        ncs = tl.zeros([BLOCK_C], tl.float32)
        last = tl.full([], 9223372036854775807, tl.int64)
        for j in range(B + C):
            if j < total:
                top = tl.maximum(tl.max(tl.where(b_key < last, b_key, -1), axis=0),
                                 tl.max(tl.where(c_key < last, c_key, -1), axis=0))
                for b in range(start, start + n_new, BF):
                    t = b + tl.arange(0, BF)
                    live = t < start + n_new
                    pos = tl.load(CAND + t, mask=live, other=0)
                    key = _order_key(tl.load(S + pos, mask=live, other=0.0), B + t - start)
                    top = tl.maximum(top, tl.max(tl.where(live & (key < last), key, -1), axis=0))
                last = top
                seq = 2147483647 - (top % 2147483648)
                from_buf = seq < B
                from_new = (seq >= B) & (seq < B + n_tok)
                i = tl.where(from_new, seq - B, 0)
                pos = tl.load(CAND + start + i, mask=from_new, other=0)
                src = tl.load(SRC + pos, mask=from_new, other=0)
                new_d = dm & ((tl.zeros([BLOCK_D], tl.int32) + from_new.to(tl.int32)) > 0)
                kn = tl.load(K + src * stride_k + d, mask=new_d, other=0.0).to(PK.dtype.element_ty)
                vn = tl.load(V + src * stride_v + d, mask=new_d, other=0.0).to(PV.dtype.element_ty)
                sn = tl.load(S + pos, mask=from_new, other=0.0)
                is_b = bb == seq
                is_c = c_seq == seq
                kt = tl.where(from_buf, tl.sum(tl.where(is_b[:, None], bk, 0.0), axis=0),
                              tl.where(from_new, kn.to(tl.float32), tl.sum(tl.where(is_c[:, None], ck, 0.0), axis=0)))
                vt = tl.where(from_buf, tl.sum(tl.where(is_b[:, None], bv, 0.0), axis=0),
                              tl.where(from_new, vn.to(tl.float32), tl.sum(tl.where(is_c[:, None], cv, 0.0), axis=0)))
                st = tl.where(from_buf, tl.sum(tl.where(is_b, bs, 0.0), axis=0),
                              tl.where(from_new, sn, tl.sum(tl.where(is_c, cs, 0.0), axis=0)))
                at_b = bb == j
                at_c = cc == j - B
                nbk = tl.where(at_b[:, None], kt[None, :], nbk)
                nbv = tl.where(at_b[:, None], vt[None, :], nbv)
                nbs = tl.where(at_b, st, nbs)
                nck = tl.where(at_c[:, None], kt[None, :], nck)
                ncv = tl.where(at_c[:, None], vt[None, :], ncv)
                ncs = tl.where(at_c, st, ncs)
        return nbk, nbv, nbs, nck, ncv, ncs

    @triton.jit
    def _insert_rows(K, V, SRC, S, ROWS, LO, HI, MERGED, CAND, PK, PV, PW, PS, PC, BK, BV, BS, BN,
                     CK, CV, CS, CN, COUNTS, stride_k, stride_v, merge_cos, score_gate, eps,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr, BLOCK_P: tl.constexpr,
                     B: tl.constexpr, BLOCK_B: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_K: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr, GATE: tl.constexpr,
                     ROUNDS: tl.constexpr):
        # One program per touched pool row: its new tokens are positions LO .. HI (sorted by row,
        # arrival order), its carried tokens the row's carry slots. The row's pivots and carry stay
        # in registers (rounded to the pool dtype wherever the torch path stores them); MERGED[t]
        # records each new token's merge decision for the second pass. ROUNDS picks the ranking
        # (module docstring); with it, the new candidates' positions are compacted into CAND[LO ...].
        prog = tl.program_id(0)
        row = tl.load(ROWS + prog)
        start = tl.load(LO + prog)
        end = tl.load(HI + prog)
        n_tok = end - start
        d = tl.arange(0, BLOCK_D)
        p = tl.arange(0, BLOCK_P)
        bb = tl.arange(0, BLOCK_B)
        cc = tl.arange(0, BLOCK_C)
        kk = tl.arange(0, BLOCK_K)
        dm = d < D
        bm2 = (bb < B)[:, None] & dm[None, :]
        cm2 = (cc < C)[:, None] & dm[None, :]
        pk, pv, pw, ps, pc = _load_row_pivots(PK, PV, PW, PS, PC, row, D, BLOCK_D, P, BLOCK_P)
        car_ix = row * C + cc
        cn = tl.load(CN + row)
        c_live = (cc < C) & (cc < cn)
        ck = tl.load(CK + car_ix[:, None] * D + d[None, :], mask=cm2 & c_live[:, None], other=0.0).to(tl.float32)
        cv = tl.load(CV + car_ix[:, None] * D + d[None, :], mask=cm2 & c_live[:, None], other=0.0).to(tl.float32)
        cs = tl.load(CS + car_ix, mask=c_live, other=0.0)

        # ---- merge stage: nearest pivot as of the call's start; merges in token order (new, carried)
        used = pc > 0
        pn = pk / tl.maximum(tl.sqrt(tl.sum(pk * pk, axis=1)), eps)[:, None]
        acc_k = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
        acc_v = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
        asum = tl.zeros([BLOCK_P], tl.float32)
        ssum = tl.zeros([BLOCK_P], tl.float32)
        csum = tl.zeros([BLOCK_P], tl.float32)
        for b in range(start, end, BT):
            t, live, src, s, k = _token_block(K, SRC, S, b, end, stride_k, D, BLOCK_D, BT)
            best, slot = _nearest_of_block(k, pn, used, eps, BLOCK_P)
            merge = live & (best >= merge_cos)
            tl.store(MERGED + t, merge.to(tl.int8), mask=live)
            v = tl.load(V + src[:, None] * stride_v + d[None, :], mask=merge[:, None] & dm[None, :], other=0.0)
            acc_k, acc_v, asum, ssum, csum = _merge_sums(k, v.to(tl.float32), s, best, slot, merge, p,
                                                         acc_k, acc_v, asum, ssum, csum)
        c_best, c_slot = _nearest_of_block(ck, pn, used, eps, BLOCK_P)
        c_merge = c_live & (c_best >= merge_cos)
        acc_k, acc_v, asum, ssum, csum = _merge_sums(ck, cv, cs, c_best, c_slot, c_merge, p,
                                                     acc_k, acc_v, asum, ssum, csum)
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
        tl.debug_barrier()  # MERGED is read back by other threads of this program

        # ---- outcomes: merged, gated (a non-merging token of a row with a pivot whose score is not
        # above score_gate x the row's mean per merged token after the merges), or candidate. The
        # candidates are ranked by one int64 key (score descending, then entry order: buffered
        # slot j -> j, new token i -> B + i, carried slot c -> B + n_tok + c). Rounds: the new
        # candidates' positions are compacted into CAND for the rounds of the buffer stage.
        # Counts: only the best B + C new candidates can be kept, so a running top list of them
        # (keys, by rank) is merged with each block: ranks by counting larger keys, no sort.
        row_mean = tl.sum(ps_m, axis=0) / tl.maximum(tl.sum(pc_m, axis=0), eps)
        # (vectors: Triton's interpreter mis-types vector & scalar-bool)
        n_pivots = tl.sum(used.to(tl.int32), axis=0)
        c_has_pivot = (tl.zeros([BLOCK_C], tl.int32) + n_pivots) > 0
        n_merged = tl.sum(c_merge.to(tl.int32), axis=0)
        n_gated = n_merged * 0
        n_new = n_merged * 0
        top = tl.full([BLOCK_K], -1, tl.int64)  # the best new candidates' keys, slot = rank
        for b in range(start, end, BF):
            t = b + tl.arange(0, BF)
            live = t < end
            s = tl.load(S + t, mask=live, other=0.0)
            merge = live & (tl.load(MERGED + t, mask=live, other=0) != 0)
            cand = live & ~merge
            if GATE:
                has_pivot = (tl.zeros([BF], tl.int32) + n_pivots) > 0
                gated = cand & has_pivot & ~(s > score_gate * row_mean)
                n_gated += tl.sum(gated.to(tl.int32), axis=0)
                cand = cand & ~gated
            n_merged += tl.sum(merge.to(tl.int32), axis=0)
            if ROUNDS:
                at = start + n_new + tl.cumsum(cand.to(tl.int32), axis=0) - 1
                tl.store(CAND + at, t, mask=cand)
            else:
                key = tl.where(cand, _order_key(s, B + t - start), -1)
                r_key = _count_above(key, key) + _count_above(key, top)
                r_top = _count_above(top, top) + _count_above(top, key)
                top = tl.maximum(_key_of_rank(top, r_top, kk), _key_of_rank(key, r_key, kk))
            n_new += tl.sum(cand.to(tl.int32), axis=0)
        c_cand = c_live & ~c_merge
        if GATE:
            c_gated = c_cand & c_has_pivot & ~(cs > score_gate * row_mean)
            n_gated += tl.sum(c_gated.to(tl.int32), axis=0)
            c_cand = c_cand & ~c_gated
        n_car = tl.sum(c_cand.to(tl.int32), axis=0)
        pk, pv, pw, ps, pc = pk_m, pv_m, pw_m, ps_m, pc_m
        if ROUNDS:
            tl.debug_barrier()  # CAND is read back by other threads of this program

        # ---- buffer: the row's buffered tokens and its candidates by rank: the first B are the
        # buffer, the next C are carried over, the rest dropped
        bn = tl.load(BN + row)
        total = bn + n_new + n_car
        n_dropped = n_merged * 0
        n_collapsed = n_merged * 0
        cn_out = cn * 0
        if n_new + n_car > 0:
            buf_ix = row * B + bb
            b_held = (bb < B) & (bb < bn)
            bk = tl.load(BK + buf_ix[:, None] * D + d[None, :], mask=bm2 & b_held[:, None], other=0.0).to(tl.float32)
            bv = tl.load(BV + buf_ix[:, None] * D + d[None, :], mask=bm2 & b_held[:, None], other=0.0).to(tl.float32)
            bs = tl.load(BS + buf_ix, mask=b_held, other=0.0)
            b_key = tl.where(b_held, _order_key(bs, bb), -1)
            c_key = tl.where(c_cand, _order_key(cs, B + n_tok + cc), -1)
            if ROUNDS:
                # the buffer and carry are built in registers, collapsed from there and stored once
                bk, bv, bs, ck, cv, cs = _ranked_by_rounds(
                    K, V, SRC, S, CAND, PK, PV, start, n_new, n_tok, total, b_key, c_key, bk, bv, bs, ck, cv, cs,
                    stride_k, stride_v, D, BLOCK_D, B, BLOCK_B, C, BLOCK_C, BF)
                bn = tl.minimum(total, B)
                cn_out = tl.minimum(tl.maximum(total - B, 0), C)
                n_dropped = tl.maximum(total - B - C, 0)
                if bn == B:  # ---- a full buffer becomes a pivot
                    pk, pv, pw, ps, pc = _collapse_buffer(bk, bv, bs, pk, pv, pw, ps, pc, eps, B, BLOCK_B, P, BLOCK_P)
                    pk = pk.to(PK.dtype.element_ty).to(tl.float32)
                    pv = pv.to(PV.dtype.element_ty).to(tl.float32)
                    bn = bn * 0
                    n_collapsed += 1
                tl.store(BK + buf_ix[:, None] * D + d[None, :], bk.to(BK.dtype.element_ty), mask=bm2)
                tl.store(BV + buf_ix[:, None] * D + d[None, :], bv.to(BV.dtype.element_ty), mask=bm2)
                tl.store(BS + buf_ix, bs, mask=bb < B)
                tl.store(CK + car_ix[:, None] * D + d[None, :], ck.to(CK.dtype.element_ty), mask=cm2)
                tl.store(CV + car_ix[:, None] * D + d[None, :], cv.to(CV.dtype.element_ty), mask=cm2)
                tl.store(CS + car_ix, cs, mask=cc < C)
            else:
                # entries are written straight to their slots; slots past them are zeroed
                r_b = _count_above(b_key, b_key) + _count_above(b_key, top) + _count_above(b_key, c_key)
                r_n = _count_above(top, b_key) + _count_above(top, top) + _count_above(top, c_key)
                r_c = _count_above(c_key, b_key) + _count_above(c_key, top) + _count_above(c_key, c_key)
                # the kept new candidates' keys and values (from their source rows, in the pool dtype)
                n_ok = top >= 0
                pos = start + tl.where(n_ok, 2147483647 - (top % 2147483648) - B, 0)
                src = tl.load(SRC + pos, mask=n_ok, other=0)
                nm2 = n_ok[:, None] & dm[None, :]
                nk = tl.load(K + src[:, None] * stride_k + d[None, :], mask=nm2, other=0.0).to(PK.dtype.element_ty)
                nv = tl.load(V + src[:, None] * stride_v + d[None, :], mask=nm2, other=0.0).to(PV.dtype.element_ty)
                ns = tl.load(S + pos, mask=n_ok, other=0.0)
                bn = tl.minimum(total, B)
                cn_out = tl.minimum(tl.maximum(total - B, 0), C)
                n_dropped = tl.maximum(total - B - C, 0)
                tl.debug_barrier()  # every read of this row's buffer and carry slots is done
                zb = (bb < B) & (bb >= bn)
                zc = (cc < C) & (cc >= cn_out)
                tl.store(BK + buf_ix[:, None] * D + d[None, :], tl.zeros([BLOCK_B, BLOCK_D], tl.float32).to(BK.dtype.element_ty),
                         mask=zb[:, None] & dm[None, :])
                tl.store(BV + buf_ix[:, None] * D + d[None, :], tl.zeros([BLOCK_B, BLOCK_D], tl.float32).to(BV.dtype.element_ty),
                         mask=zb[:, None] & dm[None, :])
                tl.store(BS + buf_ix, tl.zeros([BLOCK_B], tl.float32), mask=zb)
                tl.store(CK + car_ix[:, None] * D + d[None, :], tl.zeros([BLOCK_C, BLOCK_D], tl.float32).to(CK.dtype.element_ty),
                         mask=zc[:, None] & dm[None, :])
                tl.store(CV + car_ix[:, None] * D + d[None, :], tl.zeros([BLOCK_C, BLOCK_D], tl.float32).to(CV.dtype.element_ty),
                         mask=zc[:, None] & dm[None, :])
                tl.store(CS + car_ix, tl.zeros([BLOCK_C], tl.float32), mask=zc)
                _store_ranked(BK, BV, BS, CK, CV, CS, row, r_b, b_key >= 0, bk, bv, bs, d, dm, D, B, C)
                _store_ranked(BK, BV, BS, CK, CV, CS, row, r_n, n_ok, nk.to(tl.float32), nv.to(tl.float32), ns, d, dm, D, B, C)
                _store_ranked(BK, BV, BS, CK, CV, CS, row, r_c, c_key >= 0, ck, cv, cs, d, dm, D, B, C)
                # ---- a full buffer becomes a pivot
                if bn == B:
                    tl.debug_barrier()  # the buffer just written is read back by other threads
                    bk = tl.load(BK + buf_ix[:, None] * D + d[None, :], mask=bm2, other=0.0).to(tl.float32)
                    bv = tl.load(BV + buf_ix[:, None] * D + d[None, :], mask=bm2, other=0.0).to(tl.float32)
                    bs = tl.load(BS + buf_ix, mask=bb < B, other=0.0)
                    pk, pv, pw, ps, pc = _collapse_buffer(bk, bv, bs, pk, pv, pw, ps, pc, eps, B, BLOCK_B, P, BLOCK_P)
                    pk = pk.to(PK.dtype.element_ty).to(tl.float32)
                    pv = pv.to(PV.dtype.element_ty).to(tl.float32)
                    bn = bn * 0
                    n_collapsed += 1

        _store_row_pivots(PK, PV, PW, PS, PC, row, pk, pv, pw, ps, pc, D, BLOCK_D, P, BLOCK_P)
        tl.store(BN + row, bn)
        tl.store(CN + row, cn_out)
        # merged, gated, pivots created, dropped at the carry cap
        c4 = tl.arange(0, 4)
        out = tl.where(c4 == 0, n_merged, tl.where(c4 == 1, n_gated, tl.where(c4 == 2, n_collapsed, n_dropped)))
        tl.store(COUNTS + prog * 4 + c4, out.to(tl.int64))


# insert_rows' launch: tokens per iteration of the loops that read keys (BT), warps per program
# (one program per pool row), the ranking (rounds or counts, module docstring) and its tokens per
# iteration of the passes over scores (BF: rounds scan compacted candidates 128 at a time; counts
# compare a block with itself, BF x BF keys, so it stays small). A row's work is serial, so an
# insert takes as long as its busiest row. Rows of a few tokens run best as small latency-bound
# programs (H200, vggt-1b: the stress insert of ~23 tokens per row took 3.7 ms with 8 x 1 warp,
# 5.7 with 16 x 2, 6.1 with 32 x 4) ranked by rounds (H100, same insert: 5.5 ms against 7.2 by
# counts); long rows (default geometry, ~1,000 tokens per row) run at 16 x 2 ranked by counts
# (H100: 3.8 ms against 4.0 by rounds). Picked from the mean tokens per row; None = automatic,
# set to tune or to test one ranking.
_SEGMENT_BLOCK: int | None = None
_INSERT_WARPS: int | None = None
_RANK_BY_ROUNDS: bool | None = None
_ROUNDS_SCORE_BLOCK = 128
_COUNTS_SCORE_BLOCK = 32
_SMALL_ROWS = 64  # mean tokens per row up to which the small launch (and ranking by rounds) is used


def _launch_config(tokens: int, rows: int) -> tuple[int, int, bool]:
    """(tokens per key loop, warps, rank by rounds) for ``tokens`` new tokens over ``rows`` rows."""
    small = tokens <= _SMALL_ROWS * rows
    rounds = small if _RANK_BY_ROUNDS is None else _RANK_BY_ROUNDS
    if _SEGMENT_BLOCK is not None and _INSERT_WARPS is not None:
        return _SEGMENT_BLOCK, _INSERT_WARPS, rounds
    return (8, 1, rounds) if small else (16, 2, rounds)


INSERT_COUNTERS = ("merged", "gated", "pivots_created", "overflow_dropped")


def insert_rows(k: Tensor, v: Tensor, src: Tensor, g: Tensor, s: Tensor, piv: dict[str, Tensor],
                buf: dict[str, Tensor], car: dict[str, Tensor], merge_cos: float, score_gate: float,
                eps: float) -> Tensor:
    """A whole insert, in place on the pool, one program per touched pool row (new or carried tokens).

    Position ``i`` (0 .. n-1) is a new token in (row, arrival) order: ``g`` [n] its flat pool row
    (non-decreasing), ``s`` [n] its float32 score, ``src`` [n] the row of ``k``/``v`` [M, D]
    holding its key and value. ``piv`` holds the flat pivot tensors ``piv_k``/``piv_v``
    [R, P, D] and ``piv_w``/``piv_s``/``piv_c`` [R, P]; ``buf`` the buffers ``buf_k``/``buf_v``
    [R, B, D], ``buf_s`` [R, B] and ``buf_n`` [R]; ``car`` the carried tokens ``car_k``/``car_v``
    [R, C, D], ``car_s`` [R, C] and ``car_n`` [R] (all contiguous). Returns int64 [4] on the
    device: tokens merged, gated, pivots created, tokens dropped at the carry cap
    (``INSERT_COUNTERS``). One host synchronisation: the number of rows touched.
    """
    n = g.numel()
    pk = piv["piv_k"]
    R, P, D = pk.shape
    B = buf["buf_k"].shape[1]
    C = car["car_k"].shape[1]
    if n >= 2**31:
        raise ValueError(f"insert_rows takes fewer than 2**31 tokens per call, got {n}")
    tensors = (*piv.values(), *buf.values(), *car.values())
    if k.stride(1) != 1 or v.stride(1) != 1 or not all(t.is_contiguous() for t in tensors):
        raise ValueError("insert_rows needs unit-stride key/value rows and contiguous pool tensors")
    touched = car["car_n"] > 0
    touched.index_fill_(0, g, True)
    rows = touched.nonzero().squeeze(1)  # one synchronisation: the rows touched
    if rows.numel() == 0:
        return torch.zeros(len(INSERT_COUNTERS), dtype=torch.int64, device=g.device)
    lo = torch.searchsorted(g, rows)
    hi = torch.searchsorted(g, rows, right=True)
    merged = torch.empty(max(n, 1), dtype=torch.int8, device=g.device)
    counts = torch.empty(rows.numel(), len(INSERT_COUNTERS), dtype=torch.int64, device=g.device)
    block, warps, rounds = _launch_config(n, rows.numel())
    # rounds: the new candidates' positions, compacted per row (unused by counts)
    cand = torch.empty(max(n, 1) if rounds else 1, dtype=torch.int64, device=g.device)
    _insert_rows[(rows.numel(),)](
        k, v, src, s, rows, lo, hi, merged, cand, pk, piv["piv_v"], piv["piv_w"], piv["piv_s"], piv["piv_c"],
        buf["buf_k"], buf["buf_v"], buf["buf_s"], buf["buf_n"],
        car["car_k"], car["car_v"], car["car_s"], car["car_n"], counts,
        k.stride(0), v.stride(0), float(merge_cos), float(score_gate), eps,
        D=D, BLOCK_D=triton.next_power_of_2(D), P=P, BLOCK_P=triton.next_power_of_2(P),
        B=B, BLOCK_B=triton.next_power_of_2(B), C=C, BLOCK_C=triton.next_power_of_2(max(C, 1)),
        BLOCK_K=triton.next_power_of_2(B + C), BT=block, BF=_ROUNDS_SCORE_BLOCK if rounds else _COUNTS_SCORE_BLOCK, GATE=score_gate > 0, ROUNDS=rounds,
        num_warps=warps)
    return counts.sum(dim=0)
