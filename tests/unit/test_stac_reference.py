"""The ``stac`` policy against a recorded run of the STAC authors' rules, step by step.

``ReferenceStac`` below is a plain, loop-by-loop implementation of the rules of the authors'
public code (github.com/Rainzor/STAC, read at commit 5273f3b; files and lines cited where each
rule is implemented). It shares nothing with ``stac_backend.cache`` but the CachePolicy interface,
so the same model and engine drive both. ``python tests/unit/test_stac_reference.py`` re-records
``data/stac_reference_run.pt``: a tiny model with fan-in-scaled random weights (outputs depend on
the input), 40 frames in chunks of 4, a voxel pool that fills, carries over, merges siblings and
is retrieved from. The test replays the frames through the product's ``stac`` policy and compares,
at every step: the kept token sets per (layer, head), the pooled / buffered / carried counts, every
pivot, the retrieved tokens per head and the last global layer's attention output.

Deliberate differences of the product that this small run never reaches (so the comparison is
exact): the hard caps (voxels with LRU eviction, carried tokens per voxel; the test asserts none
was hit) and the retrieved tensors' width (the product pads to the widest head, the reference to
a fixed ``retrieval x tokens per frame``: padding is invalid and compared as such).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from stac_backend.cache import CacheConfig
from stac_backend.cache.base import CachePolicy, KeySet, StepInfo
from stac_backend.engine import Stream
from stac_backend.engine import batch as engine_batch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_tiny_model  # noqa: E402

RECORDING = Path(__file__).parent / "data" / "stac_reference_run.pt"
H_IMG, W_IMG, FRAMES, CHUNK, SEED = 42, 56, 40, 4, 5


class ReferenceStac(CachePolicy):
    """The authors' STAC rules, one token and one voxel row at a time (small runs only)."""

    name = "stac_reference"

    def __init__(self, c: CacheConfig):
        self.c = c
        self.layers: dict[int, dict[str, Tensor]] = {}  # k, v [H,T,D]; score [H,T]; frame, index, voxel [H,T]
        self.retrieved: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self.retrieved_from: dict[int, Tensor] = {}
        self.rows: dict[tuple, dict] = {}  # (layer, head, voxel xyz) -> {"piv": [P slots], "buf": [...], "carry": [...]}
        self.pooled = self.merged = self.sibling_merges = 0
        self.info: StepInfo | None = None
        self.pending: dict[int, tuple[int, int]] = {}

    # ---- attention: hot keys (old + new), then the retrieved ones (stac_voxel.py decode_sparse_attn)
    def begin_step(self, info: StepInfo) -> None:
        self.info = info

    def prepare(self, layer: int, k: Tensor, v: Tensor) -> KeySet:
        H, M = k.shape[:2]
        info = self.info
        frame = torch.arange(info.frame_offset, info.frame_offset + info.num_frames).repeat_interleave(info.tokens_per_frame)
        index = torch.arange(info.tokens_per_frame).repeat(info.num_frames)
        new = {"k": k, "v": v, "score": torch.zeros(H, M), "frame": frame.expand(H, -1), "index": index.expand(H, -1),
               "voxel": torch.full((H, M, 3), 2**40)}  # 2**40: no position (yet)
        st = self.layers.get(layer)
        old = 0 if st is None else st["k"].shape[1]
        self.layers[layer] = new if st is None else {n: torch.cat([st[n], new[n]], dim=1) for n in st}
        st = self.layers[layer]
        keys, values = st["k"], st["v"]
        bias = valid = None
        ret = self.retrieved.get(layer)
        if ret is not None:
            keys, values = torch.cat([keys, ret[0]], dim=1), torch.cat([values, ret[1]], dim=1)
            bias = torch.cat([torch.zeros(H, old + M), ret[2]], dim=1)
            valid = torch.cat([torch.ones(H, old + M, dtype=torch.bool), ret[3]], dim=1)
        self.pending[layer] = (old, M)
        return KeySet(keys, values, bias, valid, need_mass=True)

    def absorb(self, layer: int, mass: Tensor, num_queries: int) -> None:
        # h2o.py _update_scores: mass of the hot keys only, times (hot keys) / queries; new tokens
        # take it, older ones decay by gamma first.
        old, M = self.pending.pop(layer)
        live = old + M
        s = mass[:, :live] * live / num_queries
        st = self.layers[layer]
        st["score"] = torch.cat([st["score"][:, :old] * self.c.gamma + s[:, :old], s[:, old:]], dim=1)

    # ---- end of step: positions, retrieve, prune + pool (stream_session.py ~440-473)
    def end_step(self, info: StepInfo) -> None:
        c, P = self.c, info.tokens_per_frame
        pts = self._positions(info)  # [C*P, 3] voxel coords, 2**40 where no position
        for st in self.layers.values():
            st["voxel"][:, -pts.shape[0]:] = pts
        if info.frame_offset > max(c.chunk + len(c.pinned_frames) + c.window + c.hh, 16):  # stream_session.py ~453
            step = info.frame_offset // c.chunk + 1
            if step % max(1, c.window // c.chunk) == 0:
                self._retrieve(P)
        self._prune_and_pool(P)

    def _positions(self, info: StepInfo) -> Tensor:
        # stream_session.py get_pointmap ~235-248: bilinear resize (align_corners=False) of the points
        # and their confidence to the patch grid, valid = conf > threshold; stac_voxel.py
        # append_positions: voxel = floor(p / voxel_size) in float32.
        wp = info.world_points[0].permute(0, 3, 1, 2).float()
        cf = info.world_points_conf[0].unsqueeze(1).float()
        grid = info.grid_hw
        wp = F.interpolate(wp, size=grid, mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(-1, 3)
        cf = F.interpolate(cf, size=grid, mode="bilinear", align_corners=False).reshape(-1)
        vox = torch.floor(wp / torch.tensor(self.c.voxel_size, dtype=torch.float32)).long()
        vox[~(cf > self.c.conf_threshold)] = 2**40
        C = info.num_frames
        out = torch.full((C, info.tokens_per_frame, 3), 2**40, dtype=torch.long)
        out[:, info.patch_start_idx:] = vox.reshape(C, -1, 3)
        return out.reshape(-1, 3)

    def _retrieve(self, P: int) -> None:
        # stac_voxel.py _search_recent_neighbors: voxels of the last window x P hot tokens (last
        # layer, head 0), and their neighbours within 2 voxels (voxel.py lattice offsets, Chebyshev).
        last = self.layers[max(self.layers)]
        recent = last["voxel"][0, -self.c.window * P:]
        recent = {tuple(x) for x in recent.tolist() if x[0] != 2**40}
        r = self.c.retrieval_radius
        near = {(x + i, y + j, z + k) for (x, y, z) in recent for i in range(-r, r + 1)
                for j in range(-r, r + 1) for k in range(-r, r + 1)}
        budget = self.c.retrieval * P
        for layer, st in self.layers.items():
            H, D = st["k"].shape[0], st["k"].shape[2]
            # merger.py retrieve: the candidates' pivots by W (descending), retrieval x P slots, bias
            # log C, padding -inf; pivots only (stream_session.py passes `retrun_buf`, a keyword
            # stac_voxel.py retrieve_kv_parallel never reads, so return_buf stays False).
            k = torch.zeros(H, budget, D)
            v = torch.zeros(H, budget, D)
            bias = torch.full((H, budget), float("-inf"))
            valid = torch.zeros(H, budget, dtype=torch.bool)
            which = torch.full((H, budget, 2), -1, dtype=torch.long)  # (row key index, slot) per entry
            for h in range(H):
                found = [(p, key, i) for key, row in sorted(self.rows.items()) if key[0] == layer and key[1] == h
                         and key[2] in near for i, p in enumerate(row["piv"]) if p is not None]
                found.sort(key=lambda f: -f[0]["w"])
                for j, (p, key, i) in enumerate(found[:budget]):
                    k[h, j], v[h, j], bias[h, j], valid[h, j] = p["k"], p["v"], math.log(p["c"]), True
                    which[h, j, 0], which[h, j, 1] = self._row_index(key), i
            self.retrieved_from[layer] = which
            self.retrieved[layer] = (k, v, bias, valid)

    def _row_index(self, key: tuple) -> int:
        """Index of a row among the pool's pivot rows sorted by (layer, head, voxel), as recorded."""
        held = sorted(k for k, r in self.rows.items() if any(p is not None for p in r["piv"]))
        return held.index(key)

    def _prune_and_pool(self, P: int) -> None:
        # h2o.py _parallel_prune_kv: only when T > max(hot, recent); keep pinned frames + the last
        # window x P tokens + per (layer, head) the top hh x P of the rest by score, in store order.
        c = self.c
        first = next(iter(self.layers.values()))
        T = first["k"].shape[1]
        if T <= max((c.hh + c.window + len(c.pinned_frames)) * P, c.window * P):
            return
        base = torch.zeros(T, dtype=torch.bool)
        base[T - c.window * P:] = True
        for f in c.pinned_frames:
            base |= first["frame"][0] == f
        prefix = (~base).nonzero().squeeze(1)
        new_tokens: dict[tuple, list] = {}
        for layer in sorted(self.layers):
            st = self.layers[layer]
            keeps = []
            for h in range(st["k"].shape[0]):
                hh = prefix[torch.topk(st["score"][h, prefix], min(c.hh * P, prefix.numel())).indices]
                keep = torch.zeros(T, dtype=torch.bool)
                keep[base] = True
                keep[hh] = True
                keeps.append(keep)
                # stac_voxel.py _pool_drops_vectorized_parallel: the dropped tokens, in store order,
                # with a position (merger.py insert_and_merge: voxel id >= 0), go to the pool.
                for t in (~keep).nonzero().squeeze(1).tolist():
                    vox = tuple(st["voxel"][h, t].tolist())
                    if vox[0] != 2**40:
                        new_tokens.setdefault((layer, h, vox), []).append((st["k"][h, t], st["v"][h, t], st["score"][h, t].item()))
                        self.pooled += 1
            keep = torch.stack(keeps)
            self.layers[layer] = {n: x[keep].reshape(x.shape[0], -1, *x.shape[2:]) for n, x in st.items()}
        self._insert(new_tokens)

    # ---- the pool (merger_kernels.cu, as the reference's STAC mode runs it: voxel_backend "cuda")
    def _insert(self, new_tokens: dict[tuple, list]) -> None:
        c = self.c
        B, Pv = c.buffer_size, c.max_pivots
        # merger.py _insert_and_merge_fused_cuda_seg: the call's tokens, then the carried-over ones.
        for key in set(new_tokens) | {k for k, r in self.rows.items() if r["carry"]}:
            row = self.rows.setdefault(key, {"piv": [None] * Pv, "buf": [], "carry": []})
            toks = new_tokens.get(key, []) + row["carry"]
            row["carry"] = []
            pivots = [p for p in row["piv"] if p is not None]
            if pivots:
                # one2one_merge_kernel: cosine to each pivot's normalised key (as of the call's
                # start), merge at >= sim_thresh with weight exp(cos) into the first best pivot;
                # then the gate score > score_threshold x (sum S / sum C after the merges).
                unit = [F.normalize(p["k"], dim=0, eps=1e-6) for p in row["piv"] if p is not None]
                slots = [i for i, p in enumerate(row["piv"]) if p is not None]
                best = []
                for k, _, _ in toks:
                    kn = F.normalize(k, dim=0, eps=1e-6)
                    cos = [max(-1.0, min(1.0, float(kn @ u))) for u in unit]
                    j = max(range(len(cos)), key=lambda i: (cos[i], -i))
                    best.append((cos[j], slots[j]))
                acc = {}
                for (k, v, s), (cs, slot) in zip(toks, best):
                    if cs >= c.merge_cos:
                        a = math.exp(cs)
                        ka, va, aa, sa, ca = acc.get(slot, (0, 0, 0.0, 0.0, 0))
                        acc[slot] = (ka + a * k, va + a * v, aa + a, sa + s, ca + 1)
                        self.merged += 1
                for slot, (ka, va, aa, sa, ca) in acc.items():
                    p = row["piv"][slot]
                    w = p["w"] + aa
                    p["k"], p["v"] = (p["w"] * p["k"] + ka) / w, (p["w"] * p["v"] + va) / w
                    p["w"], p["s"], p["c"] = w, p["s"] + sa, p["c"] + ca
                live = [p for p in row["piv"] if p is not None]
                gate = c.score_gate_value * sum(p["s"] for p in live) / max(sum(p["c"] for p in live), 1e-6)
                cands = [t for t, (cs, _) in zip(toks, best) if cs < c.merge_cos and t[2] > gate]
            else:
                cands = toks
            # buffer_topb_kernel: buffered then new candidates, stable sort by score (descending):
            # the first B stay, the rest is carried over (unbounded in the reference).
            entries = sorted(row["buf"] + cands, key=lambda t: -t[2])
            row["buf"], row["carry"] = entries[:B], entries[B:]
            if len(row["buf"]) == B:
                self._collapse(row)

    def _collapse(self, row: dict) -> None:
        # all2one_merge_fused_kernel: seed = first highest score, a_i = exp(cos(k_i, seed)); a row
        # without a free slot first merges its lowest-W pivot into its most similar sibling (pivot
        # keys), the victim's W times exp(cos - 1); the new pivot takes the first free slot.
        buf = row["buf"]
        seed = F.normalize(max(buf, key=lambda t: t[2])[0], dim=0, eps=1e-6)
        a = [math.exp(max(-1.0, min(1.0, float(F.normalize(k, dim=0, eps=1e-6) @ seed)))) for k, _, _ in buf]
        w = sum(a)
        new = {"k": sum(ai * k for ai, (k, _, _) in zip(a, buf)) / w, "v": sum(ai * v for ai, (_, v, _) in zip(a, buf)) / w,
               "w": w, "s": sum(s for _, _, s in buf), "c": float(len(buf))}
        piv = row["piv"]
        if all(p is not None for p in piv):
            victim = min(range(len(piv)), key=lambda i: (piv[i]["w"], i))
            vu = F.normalize(piv[victim]["k"], dim=0, eps=1e-6)
            sims = [(max(-1.0, min(1.0, float(F.normalize(p["k"], dim=0, eps=1e-6) @ vu))), -i)
                    for i, p in enumerate(piv) if i != victim]
            sim, neg = max(sims)
            nb, pv_, pn = -neg, piv[victim], piv[-neg]
            wv = pv_["w"] * math.exp(sim - 1.0)
            wm = wv + pn["w"]
            piv[nb] = {"k": (wv * pv_["k"] + pn["w"] * pn["k"]) / wm, "v": (wv * pv_["v"] + pn["w"] * pn["v"]) / wm,
                       "w": wm, "s": pv_["s"] + pn["s"], "c": pv_["c"] + pn["c"]}
            piv[victim] = new
            self.sibling_merges += 1
        else:
            piv[piv.index(None)] = new
        row["buf"] = []

    def memory_bytes(self) -> int:
        return 0

    def reset(self) -> None:
        self.__init__(self.c)


class _Cfg:
    """The reference's settings in the names ReferenceStac reads (from the product's CacheConfig)."""

    def __init__(self, config: CacheConfig, score_gate: float = 0.2):
        self.__dict__.update(config.to_dict())
        self.score_gate_value = score_gate  # stream_session.py: "score_threshold": 0.2


# ------------------------------------------------------------------------------ recording
def _frames() -> Tensor:
    return torch.rand(FRAMES, 3, H_IMG, W_IMG, generator=torch.Generator().manual_seed(SEED))


def _config(voxel_size: float, conf_threshold: float) -> CacheConfig:
    # Small pool rows so that every rule is reached in 12 steps: buffers of 4 fill and carry over,
    # rows of 2 pivots merge siblings; a carry cap the run never reaches (the reference has none).
    return CacheConfig(policy="stac", voxel_size=voxel_size, conf_threshold=conf_threshold, buffer_size=4,
                       max_pivots=2, merge_cos=0.6, pool_carry_slots=256, max_voxels=512)


def _capture_outputs(monkeypatch_like, store: list) -> None:
    """Record each global layer's attention output (the step's tokens) as the engine computes it."""
    original = engine_batch.BatchedGlobalAttention.attend

    def attend(self, layer, q, k, v):
        out = original(self, layer, q, k, v)
        store.append((layer, out[0].detach().clone()))
        return out

    monkeypatch_like.setattr(engine_batch.BatchedGlobalAttention, "attend", attend)


def _pool_rows(rows: dict, P: int, D: int) -> dict:
    """Every pool row holding a pivot, sorted by (layer, head, voxel); empty slots are zeros."""
    keys = sorted(k for k, r in rows.items() if any(p is not None for p in r["piv"]))
    out = {"key": torch.tensor([[k[0], k[1], *k[2]] for k in keys], dtype=torch.long).reshape(-1, 5)}
    for name in ("w", "s", "c"):
        out[name] = torch.tensor([[0.0 if p is None else float(p[name]) for p in rows[k]["piv"]] for k in keys]).reshape(-1, P)
    for name in ("k", "v"):
        out[name] = torch.zeros(len(keys), P, D)
        for i, k in enumerate(keys):
            for j, p in enumerate(rows[k]["piv"]):
                if p is not None:
                    out[name][i, j] = p[name].float()
        out[name] = out[name].half()  # (half precision keeps the recording small)
    return out


def record() -> dict:
    torch.manual_seed(0)
    model = make_tiny_model(seed=3)
    frames = _frames()
    # Voxel size and confidence threshold from the first step's points: a few voxels per axis, a
    # quarter of the patches without a position.
    probe = Stream(model, cache=CacheConfig(policy="full", chunk=CHUNK)).push(frames[:CHUNK])
    extent = (probe["world_points"].amax(dim=(0, 1, 2)) - probe["world_points"].amin(dim=(0, 1, 2))).max().item()
    conf = float(probe["world_points_conf"].flatten().quantile(0.25))
    config = _config(voxel_size=round(extent / 3, 4), conf_threshold=round(conf, 4))

    class _Patch:
        def setattr(self, obj, name, value):
            setattr(obj, name, value)

    original = engine_batch.BatchedGlobalAttention.attend
    outputs: list = []
    _capture_outputs(_Patch(), outputs)
    try:
        ref = ReferenceStac(_Cfg(config))
        stream = Stream(model, cache=ref, chunk_size=CHUNK)
        steps = []
        for start in range(0, FRAMES, CHUNK):
            outputs.clear()
            out = stream.push(frames[start : start + CHUNK])
            steps.append({
                "kept": {l: (st["frame"] * 64 + st["index"]).to(torch.int16) for l, st in ref.layers.items()},
                "pooled": ref.pooled,
                "merged": ref.merged,
                "sibling_merges": ref.sibling_merges,
                "buffered": sum(len(r["buf"]) for r in ref.rows.values()),
                "carried": sum(len(r["carry"]) for r in ref.rows.values()),
                "pivots": _pool_rows(ref.rows, config.max_pivots, model.config.embed_dim // model.config.num_heads),
                # retrieved entries as (row, slot) of the previous step's pivots: the pool before this
                # step's evictions (keeps the recording small)
                "retrieved": {l: ref.retrieved_from[l].to(torch.int16) for l in ref.retrieved},
                "tokens": outputs[-1][1].half(),
                "pose_enc": out["pose_enc"].clone(),
            })
    finally:
        engine_batch.BatchedGlobalAttention.attend = original
    return {"config": config.to_dict(), "steps": steps}


# ------------------------------------------------------------------------------ the test
@pytest.fixture(scope="module")
def recording():
    if not RECORDING.exists():
        pytest.fail(f"{RECORDING} missing: run python {Path(__file__).name} to record it")
    return torch.load(RECORDING, weights_only=True)


def test_recording_reaches_every_rule(recording):
    """The recorded run fills the pool, carries over, merges pivots and retrieves (not vacuous)."""
    steps = recording["steps"]
    last = steps[-1]
    assert last["pooled"] > 1000 and max(s["carried"] for s in steps) > 0
    assert last["merged"] > 100 and last["sibling_merges"] > 10
    first_retrieval = next(i for i, s in enumerate(steps) if s["retrieved"])
    assert first_retrieval == 20 // CHUNK  # first frame index 20 > max(4 + 1 + 4 + 2, 16)
    assert any((r[..., 0] >= 0).any() for r in steps[-1]["retrieved"].values())


def test_stac_policy_matches_the_reference_rules_at_every_step(recording, monkeypatch):
    check_against_recording(recording, monkeypatch, "cpu")


def check_against_recording(recording: dict, monkeypatch, device: str) -> None:
    """Stream the recorded frames through the ``stac`` policy on ``device`` (on CUDA the pool's
    insert runs its kernel) and compare every step with the recording."""
    config = CacheConfig.from_dict({**recording["config"], "pinned_frames": tuple(recording["config"]["pinned_frames"])})
    model = make_tiny_model(seed=3).to(device)
    frames = _frames().to(device)
    outputs: list = []
    _capture_outputs(monkeypatch, outputs)
    stream = Stream(model, cache=config, chunk_size=CHUNK)
    for i, expected in enumerate(recording["steps"]):
        outputs.clear()
        out = stream.push(frames[i * CHUNK : (i + 1) * CHUNK])
        cache = stream.cache
        for layer, ids in expected["kept"].items():
            st = cache.layers[layer]
            assert torch.equal((st.frame * 64 + st.index).to(torch.int16).cpu(), ids), (i, layer)
        stats = cache.stats()
        assert stats["pooled_tokens"] == expected["pooled"], i
        assert stats["pool_buffered_tokens"] == expected["buffered"], i
        assert stats["pool_carried_tokens"] == expected["carried"], i
        assert stats["pool_overflow_dropped_tokens"] == 0 and stats["pool_evicted_voxels"] == 0
        _assert_same_pivots(cache.pool, expected["pivots"], i)
        assert set(cache.retrieved) == set(expected["retrieved"]), i
        before = recording["steps"][i - 1]["pivots"] if i else None
        for layer, which in expected["retrieved"].items():
            gk, gv, gb, gvalid = (x.cpu() for x in cache.retrieved[layer])
            valid = which[..., 0] >= 0  # [H, slots]: pivots first, ranked by W
            n = valid.sum(dim=1)
            assert torch.equal(gvalid.sum(dim=1), n) and bool(gvalid[:, : int(n.max())].eq(valid[:, : int(n.max())]).all()), (i, layer)
            for h in range(which.shape[0]):
                m = int(n[h])
                r, j = which[h, :m, 0].long(), which[h, :m, 1].long()
                torch.testing.assert_close(gk[h, :m].half(), before["k"][r, j], rtol=2e-3, atol=2e-3)
                torch.testing.assert_close(gv[h, :m].half(), before["v"][r, j], rtol=2e-3, atol=2e-3)
                torch.testing.assert_close(gb[h, :m], before["c"][r, j].log(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(outputs[-1][1].half().cpu(), expected["tokens"], rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(out["pose_enc"].cpu(), expected["pose_enc"], rtol=1e-4, atol=1e-5)


def _assert_same_pivots(pool, expected: dict, step: int) -> None:
    t = {name: x.cpu() for name, x in pool._tensors.items()}
    held = t["piv_c"].sum(dim=-1) > 0  # [L, H, V]
    got = {}
    for l, h, r in held.nonzero().tolist():
        key = int(t["row_key"][r])
        xyz = [((key >> (21 * a)) & ((1 << 21) - 1)) - (1 << 20) for a in range(3)]
        got[(l, h, *xyz)] = r
    keys = [tuple(k) for k in expected["key"].tolist()]
    assert sorted(got) == keys, step
    for i, k in enumerate(keys):
        l, h, r = k[0], k[1], got[k]
        torch.testing.assert_close(t["piv_c"][l, h, r], expected["c"][i], rtol=0, atol=0)
        torch.testing.assert_close(t["piv_w"][l, h, r], expected["w"][i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t["piv_s"][l, h, r], expected["s"][i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t["piv_k"][l, h, r].half(), expected["k"][i], rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(t["piv_v"][l, h, r].half(), expected["v"][i], rtol=2e-3, atol=2e-3)


if __name__ == "__main__":
    torch.set_num_threads(1)
    data = record()
    RECORDING.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, RECORDING)
    s = data["steps"][-1]
    print(f"wrote {RECORDING} ({RECORDING.stat().st_size} B): pooled {s['pooled']}, pivot rows {len(s['pivots']['key'])}, "
          f"carried max {max(x['carried'] for x in data['steps'])}, config {data['config']}")
