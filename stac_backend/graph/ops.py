"""STAC's cache operations as custom ops over fixed-budget state tensors.

Five operations, each a torch custom op (``torch.ops.stac.*``, with a fake implementation so
``torch.export`` can trace through it) and, in the exported ONNX graph, one node of domain
``stac`` whose op_type is the TensorRT plugin name:

====================  ===================  ====================================================
torch op              ONNX / TRT plugin    what it does
====================  ===================  ====================================================
stac::attention       StacAttention        attention with per-key logit bias, key mask and the
                                           per-key probability mass (column sums)
stac::score_decay     StacScoreDecay       decayed cumulative score: S <- gamma S + mass * live / Nq
stac::topk_keep       StacTopKKeep         append the step's tokens (+ world positions), keep
                                           pinned + window + top-hh per (layer, head); emit the
                                           evicted tokens
stac::pool_update     StacVoxelPoolUpdate  file the evicted tokens into the voxel pool
stac::retrieve        StacRetrieve         pivots / buffered tokens near the recent window,
                                           every refresh step from retrieval_start_frame on
====================  ===================  ====================================================

The eager implementations (``*_impl``, on torch tensors) rebuild the project's reference objects
(``HeavyHitterCache``, ``StacCache``, ``VoxelPool``, ``attention_with_key_mass``) from the state
tensors of each batch row, call the reference methods and pack the result back into the
fixed-size tensors. The torch functional step, the ONNX Runtime custom ops and the TensorRT
Python plugins all call these functions, so every runtime runs the engine's own cache code.

Padding conventions: a layer's hot store holds ``hot_len`` tokens (the same count in every head)
at the front of its budget; evicted tokens come first in their budget, ``ev_len`` per layer;
retrieved tokens are valid where ``ret_valid`` (bias -inf and zero K/V elsewhere, as
``VoxelPool.retrieve`` pads them).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..cache import CacheConfig, CacheGeometry, HeavyHitterCache, StacCache, StepInfo
from ..cache.attention import attention_with_key_mass
from ..cache.token_store import LayerTokens, step_token_ids
from ..cache.voxel_pool import VoxelPool
from .layout import POOL_FIELDS

__all__ = [
    "attention_impl",
    "score_decay_impl",
    "topk_keep_impl",
    "pool_update_impl",
    "retrieve_impl",
    "PLUGIN_NAMES",
]

# torch op name -> ONNX op_type / TensorRT plugin name (namespace "stac", version "1")
PLUGIN_NAMES = {
    "attention": "StacAttention",
    "score_decay": "StacScoreDecay",
    "topk_keep": "StacTopKKeep",
    "pool_update": "StacVoxelPoolUpdate",
    "retrieve": "StacRetrieve",
}
PLUGIN_NAMESPACE = "stac"
PLUGIN_VERSION = "1"


# ---------------------------------------------------------------------- reference objects
def _config(**fields) -> CacheConfig:
    """A CacheConfig for the reference objects (chunk is irrelevant to them; keep it valid). They hold
    the state's stores as compact ``LayerTokens`` (time order), so they take the compact store."""
    fields.setdefault("chunk", 1)
    fields.setdefault("store", "compact")
    fields["pinned_frames"] = tuple(int(f) for f in fields.get("pinned_frames", (0,)))
    return CacheConfig(**fields)


def _geometry(num_layers: int, num_heads: int, head_dim: int) -> CacheGeometry:
    return CacheGeometry(num_layers, num_heads, head_dim, torch.float32, "cpu")


class _RecordingMixin:
    """A reference policy whose evictions are recorded instead of pooled."""

    def on_evict(self, layer, store, heads, tokens, info):  # noqa: D401 - reference signature
        self.evicted[layer] = (store, heads, tokens)


class _RecordingHeavyHitter(_RecordingMixin, HeavyHitterCache):
    def __init__(self, config, geometry):
        super().__init__(config, geometry)
        self.evicted = {}


class _RecordingStac(_RecordingMixin, StacCache):
    def __init__(self, config, geometry):
        super().__init__(config, geometry)
        self.evicted = {}


def _pool(tensors: dict[str, Tensor], num_layers: int, num_heads: int, head_dim: int, *, voxel_size: float,
          merge_cos: float, score_gate: float) -> VoxelPool:
    """A VoxelPool whose tensors are (copies of) one batch row of the state; its sizes (voxels,
    pivots, buffer and carry slots) are those of the tensors."""
    V = tensors["row_key"].shape[0]
    P = tensors["piv_c"].shape[-1]
    B = tensors["buf_s"].shape[-1]
    C = tensors["car_s"].shape[-1]
    pool = VoxelPool(num_layers, num_heads, head_dim, voxel_size=voxel_size, buffer_size=B, max_pivots=P,
                     merge_cos=merge_cos, score_gate=score_gate, max_voxels=V, initial_voxels=V, carry_slots=C,
                     dtype=tensors["piv_k"].dtype, device=tensors["piv_k"].device)
    pool.import_state({name: tensors[name] for name in POOL_FIELDS})
    return pool


# ---------------------------------------------------------------------- StacAttention
def attention_impl(q: Tensor, k: Tensor, v: Tensor, key_bias: Tensor, key_valid: Tensor, need_mass: int) -> tuple[Tensor, Tensor]:
    """out [B,H,Nq,Dv], mass [B,H,Nk] (zeros when need_mass is 0)."""
    out, mass = attention_with_key_mass(q, k, v, key_bias=key_bias, key_valid=key_valid, need_mass=bool(need_mass))
    if mass is None:
        mass = torch.zeros(k.shape[:3], dtype=torch.float32, device=k.device)
    return out, mass


# ---------------------------------------------------------------------- StacScoreDecay
def score_decay_impl(hot_score: Tensor, hot_len: Tensor, mass: Tensor, ret_valid: Tensor, gamma: float) -> Tensor:
    """Scores [B, L, H, Ns + M] after the step: the old tokens' decayed scores (first hot_len of
    Ns, zero padding after) and the new tokens' scores (last M), exactly as ``absorb`` computes them.

    mass [B, L, H, Ns + T + M] is the attention mass over (hot budget, retrieved, new) keys.
    """
    Bn, L, H, Ns = hot_score.shape
    T = ret_valid.shape[-1]
    M = mass.shape[-1] - Ns - T
    out = torch.zeros(Bn, L, H, Ns + M, dtype=torch.float32, device=hot_score.device)
    config = _config(gamma=float(gamma))
    for b in range(Bn):
        cache = HeavyHitterCache(config, _geometry(L, H, 1))
        for layer in range(L):
            n = int(hot_len[b, layer])
            m = mass[b, layer]
            extra = ret_valid[b, layer]
            placeholder = torch.zeros(H, n + M, device=m.device)
            placeholder[:, :n] = hot_score[b, layer, :, :n]
            cache.layers[layer] = LayerTokens(placeholder[:, :, None], placeholder[:, :, None], None, None, placeholder, None)
            if bool(extra.any()):  # the engine attended retrieved keys: valid mask over (old, retrieved, new)
                compact = torch.cat([m[:, :n], m[:, Ns : Ns + T], m[:, Ns + T :]], dim=1)
                # (scores are rescaled by hot keys / queries: retrieved keys not counted)
                valid = torch.cat([torch.ones(H, n, dtype=torch.bool, device=m.device), torch.zeros_like(extra),
                                   torch.ones(H, M, dtype=torch.bool, device=m.device)], dim=1)
                cache._pending[layer] = (n, T, M, valid)
            else:  # no retrieved keys: the engine's key set is (old, new) with no mask
                compact = torch.cat([m[:, :n], m[:, Ns + T :]], dim=1)
                cache._pending[layer] = (n, 0, M, None)
            cache.absorb(layer, compact, M)
            score = cache.layers[layer].score
            out[b, layer, :, :n] = score[:, :n]
            out[b, layer, :, Ns:] = score[:, n:]
    return out


# ---------------------------------------------------------------------- StacTopKKeep
def topk_keep_impl(
    hot_k: Tensor, hot_v: Tensor, hot_frame: Tensor, hot_index: Tensor, hot_pos: Tensor, hot_len: Tensor,
    new_k: Tensor, new_v: Tensor, score: Tensor, world_points: Tensor, world_points_conf: Tensor, frame_offset: Tensor,
    window: int, hh: int, pinned_frames: Sequence[int], patch_size: int, patch_start_idx: int,
    conf_threshold: float, track_positions: int,
) -> tuple[Tensor, ...]:
    """Append the step's tokens to each layer's hot store and prune it as ``end_step`` does.

    Returns the pruned store (hot_k, hot_v, hot_frame, hot_index, hot_score, hot_pos, hot_len at the
    Ns budget) and the evicted tokens (ev_k, ev_v [B,L,H,M,D], ev_score [B,L,H,M], ev_pos
    [B,L,H,M,3], ev_len [B,L]); with track_positions the new tokens get the point head's
    positions first (``stac``), else positions stay NaN (``heavy_hitter``).
    """
    Bn, L, H, Ns, D = hot_k.shape
    M = new_k.shape[3]
    C, Hi, Wi = world_points.shape[1:4]
    P = patch_start_idx + (Hi // patch_size) * (Wi // patch_size)
    if C * P != M:
        raise ValueError(f"StacTopKKeep: {M} new tokens per head but {C} frames of {P} tokens")
    dev = hot_k.device
    out_k, out_v = torch.zeros_like(hot_k), torch.zeros_like(hot_v)
    out_frame = torch.full_like(hot_frame, -1)
    out_index = torch.zeros_like(hot_index)
    out_score = torch.zeros(Bn, L, H, Ns, dtype=torch.float32, device=dev)
    out_pos = torch.full_like(hot_pos, float("nan"))
    out_len = torch.zeros_like(hot_len)
    ev_k = torch.zeros(Bn, L, H, M, D, dtype=hot_k.dtype, device=dev)
    ev_v = torch.zeros_like(ev_k)
    ev_score = torch.zeros(Bn, L, H, M, dtype=torch.float32, device=dev)
    ev_pos = torch.full((Bn, L, H, M, 3), float("nan"), dtype=torch.float32, device=dev)
    ev_len = torch.zeros(Bn, L, dtype=torch.int64, device=dev)
    config = _config(window=int(window), hh=int(hh), pinned_frames=tuple(pinned_frames), conf_threshold=float(conf_threshold),
                     chunk=min(C, int(window)))
    cls = _RecordingStac if track_positions else _RecordingHeavyHitter
    for b in range(Bn):
        cache = cls(config, _geometry(L, H, D))
        offset = int(frame_offset[b])
        frame_new, index_new = step_token_ids(H, offset, C, P, dev)
        for layer in range(L):
            n = int(hot_len[b, layer])
            s = score[b, layer]
            cache.layers[layer] = LayerTokens(
                torch.cat([hot_k[b, layer, :, :n], new_k[b, layer]], dim=1),
                torch.cat([hot_v[b, layer, :, :n], new_v[b, layer]], dim=1),
                torch.cat([hot_frame[b, layer, :, :n], frame_new], dim=1),
                torch.cat([hot_index[b, layer, :, :n], index_new], dim=1),
                torch.cat([s[:, :n], s[:, Ns:]], dim=1),
                torch.cat([hot_pos[b, layer, :, :n], torch.full((H, M, 3), float("nan"), device=dev)], dim=1),
            )
        info = StepInfo(offset, C, P, patch_start_idx, (Hi // patch_size, Wi // patch_size),
                        world_points[b : b + 1], world_points_conf[b : b + 1])
        if track_positions:
            cache._attach_positions(info)
        HeavyHitterCache.end_step(cache, info)
        for layer in range(L):
            store = cache.layers[layer]
            n = store.num_tokens
            if n > Ns:
                raise ValueError(f"StacTopKKeep: {n} tokens kept per head exceed the hot budget of {Ns}")
            out_k[b, layer, :, :n], out_v[b, layer, :, :n] = store.k, store.v
            out_frame[b, layer, :, :n], out_index[b, layer, :, :n] = store.frame, store.index
            out_score[b, layer, :, :n], out_pos[b, layer, :, :n] = store.score, store.position
            out_len[b, layer] = n
            if layer in cache.evicted:
                old, heads, tokens = cache.evicted[layer]
                E = heads.numel() // H
                if E > M:
                    raise ValueError(f"StacTopKKeep: {E} evicted tokens per head exceed the step's {M} new tokens "
                                     "(chunk larger than the window?)")
                order = torch.arange(H, device=dev).repeat_interleave(E)
                if not torch.equal(heads, order):
                    raise RuntimeError("StacTopKKeep: heads evicted unequal token counts")
                tokens = tokens.reshape(H, E)
                hh_idx = torch.arange(H, device=dev)[:, None]
                ev_k[b, layer, :, :E] = old.k[hh_idx, tokens]
                ev_v[b, layer, :, :E] = old.v[hh_idx, tokens]
                ev_score[b, layer, :, :E] = old.score[hh_idx, tokens]
                ev_pos[b, layer, :, :E] = old.position[hh_idx, tokens]
                ev_len[b, layer] = E
    return out_k, out_v, out_frame, out_index, out_score, out_pos, out_len, ev_k, ev_v, ev_score, ev_pos, ev_len


# ---------------------------------------------------------------------- StacVoxelPoolUpdate
def pool_update_impl(
    pool: Sequence[Tensor], ev_k: Tensor, ev_v: Tensor, ev_score: Tensor, ev_pos: Tensor, ev_len: Tensor, steps: Tensor,
    voxel_size: float, merge_cos: float, score_gate: float,
) -> tuple[Tensor, ...]:
    """File each layer's evicted tokens into the voxel pool (``StacCache.on_evict``), layer by layer.

    pool: the 11 ``VoxelPool`` tensors (POOL_FIELDS order) with a leading batch dim. Returns them updated.
    """
    tensors = dict(zip(POOL_FIELDS, pool))
    Bn, L, H, M, D = ev_k.shape
    outs = {name: t.clone() for name, t in tensors.items()}
    config = _config(voxel_size=float(voxel_size), merge_cos=float(merge_cos))
    dummy = torch.zeros(1, 1, dtype=torch.int32, device=ev_k.device)
    for b in range(Bn):
        cache = StacCache(config, _geometry(L, H, D))
        cache.pool = _pool({n: t[b] for n, t in tensors.items()}, L, H, D, voxel_size=float(voxel_size),
                           merge_cos=float(merge_cos), score_gate=float(score_gate))
        cache.steps = int(steps[b].reshape(-1)[0])
        for layer in range(L):
            E = int(ev_len[b, layer])
            if E == 0:
                continue
            store = LayerTokens(ev_k[b, layer, :, :E], ev_v[b, layer, :, :E], dummy, dummy, ev_score[b, layer, :, :E],
                                ev_pos[b, layer, :, :E])
            heads = torch.arange(H, device=ev_k.device).repeat_interleave(E)
            tokens = torch.arange(E, device=ev_k.device).repeat(H)
            cache.on_evict(layer, store, heads, tokens, None)
        state = cache.pool.export_state()
        for name in POOL_FIELDS:
            outs[name][b] = state[name]
    return tuple(outs[name] for name in POOL_FIELDS)


# ---------------------------------------------------------------------- StacRetrieve
def retrieve_impl(
    pool: Sequence[Tensor], hot_frame: Tensor, hot_pos: Tensor, hot_len: Tensor,
    ret_k: Tensor, ret_v: Tensor, ret_bias: Tensor, ret_valid: Tensor, steps: Tensor, latest_frame: Tensor,
    window: int, retrieval: int, retrieval_start_frame: int, refresh_steps: int, radius: int, include_buffer: int,
    voxel_size: float,
) -> tuple[Tensor, ...]:
    """Refresh the retrieved tokens as ``StacCache.end_step`` does on a retrieval step (``steps``
    already counts this step; the exported step calls it on the pool before or after this step's
    update, as ``retrieve_before_prune`` says); otherwise they pass through unchanged. Returns (ret_k, ret_v, ret_bias,
    ret_valid, row_last_used) - retrieval marks its candidate voxels as used."""
    tensors = dict(zip(POOL_FIELDS, pool))
    Bn, L, H, T, D = ret_k.shape
    out_k, out_v, out_bias, out_valid = ret_k.clone(), ret_v.clone(), ret_bias.clone(), ret_valid.clone()
    last_used = tensors["row_last_used"].clone()
    tokens_per_frame = T // max(int(retrieval), 1)
    config = _config(window=int(window), retrieval=int(retrieval), retrieval_start_frame=int(retrieval_start_frame),
                     retrieval_every=int(refresh_steps), retrieval_radius=int(radius), include_buffer=bool(include_buffer),
                     voxel_size=float(voxel_size), chunk=1)
    for b in range(Bn):
        latest = int(latest_frame[b])
        step = int(steps[b].reshape(-1)[0])
        if not (config.retrieval and latest + 1 >= config.retrieval_start_frame and step % config.refresh_steps == 0):
            continue
        cache = StacCache(config, _geometry(L, H, D))
        cache.pool = _pool({n: t[b] for n, t in tensors.items()}, L, H, D, voxel_size=float(voxel_size), merge_cos=0.8,
                           score_gate=0.2)
        cache.steps = step
        for layer in range(L):
            n = int(hot_len[b, layer])
            empty = hot_frame.new_zeros(H, n, 1)
            cache.layers[layer] = LayerTokens(empty, empty, hot_frame[b, layer, :, :n], hot_frame[b, layer, :, :n], None,
                                              hot_pos[b, layer, :, :n])
        info = StepInfo(latest, 1, tokens_per_frame, 0, (0, 0))
        cache._retrieve(info, latest)
        for layer in range(L):
            k, v, bias, valid = cache.retrieved[layer]
            t = k.shape[1]
            if t > T:
                raise ValueError(f"StacRetrieve: {t} retrieved tokens exceed the budget of {T}")
            out_k[b, layer], out_v[b, layer] = 0, 0
            out_bias[b, layer], out_valid[b, layer] = float("-inf"), False
            out_k[b, layer, :, :t], out_v[b, layer, :, :t] = k, v
            out_bias[b, layer, :, :t], out_valid[b, layer, :, :t] = bias, valid
        last_used[b] = cache.pool.export_state()["row_last_used"]
    return out_k, out_v, out_bias, out_valid, last_used


# ---------------------------------------------------------------------- torch custom ops
@torch.library.custom_op("stac::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, key_bias: Tensor, key_valid: Tensor, need_mass: int) -> tuple[Tensor, Tensor]:
    return attention_impl(q, k, v, key_bias, key_valid, need_mass)


@attention.register_fake
def _(q, k, v, key_bias, key_valid, need_mass):
    return q.new_empty(q.shape[:3] + (v.shape[3],)), k.new_empty(k.shape[:3], dtype=torch.float32)


@torch.library.custom_op("stac::score_decay", mutates_args=())
def score_decay(hot_score: Tensor, hot_len: Tensor, mass: Tensor, ret_valid: Tensor, gamma: float) -> Tensor:
    return score_decay_impl(hot_score, hot_len, mass, ret_valid, gamma)


@score_decay.register_fake
def _(hot_score, hot_len, mass, ret_valid, gamma):
    B, L, H, Ns = hot_score.shape
    M = mass.shape[-1] - Ns - ret_valid.shape[-1]
    return hot_score.new_empty(B, L, H, Ns + M)


@torch.library.custom_op("stac::topk_keep", mutates_args=())
def topk_keep(
    hot_k: Tensor, hot_v: Tensor, hot_frame: Tensor, hot_index: Tensor, hot_pos: Tensor, hot_len: Tensor,
    new_k: Tensor, new_v: Tensor, score: Tensor, world_points: Tensor, world_points_conf: Tensor, frame_offset: Tensor,
    window: int, hh: int, pinned_frames: list[int], patch_size: int, patch_start_idx: int, conf_threshold: float,
    track_positions: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return topk_keep_impl(hot_k, hot_v, hot_frame, hot_index, hot_pos, hot_len, new_k, new_v, score, world_points,
                          world_points_conf, frame_offset, window, hh, pinned_frames, patch_size, patch_start_idx,
                          conf_threshold, track_positions)


@topk_keep.register_fake
def _(hot_k, hot_v, hot_frame, hot_index, hot_pos, hot_len, new_k, new_v, score, world_points, world_points_conf,
      frame_offset, window, hh, pinned_frames, patch_size, patch_start_idx, conf_threshold, track_positions):
    B, L, H, Ns, D = hot_k.shape
    M = new_k.shape[3]
    return (
        torch.empty_like(hot_k), torch.empty_like(hot_v), torch.empty_like(hot_frame), torch.empty_like(hot_index),
        hot_k.new_empty(B, L, H, Ns), torch.empty_like(hot_pos), torch.empty_like(hot_len),
        hot_k.new_empty(B, L, H, M, D), hot_k.new_empty(B, L, H, M, D), hot_k.new_empty(B, L, H, M),
        hot_k.new_empty(B, L, H, M, 3), hot_len.new_empty(B, L),
    )


@torch.library.custom_op("stac::pool_update", mutates_args=())
def pool_update(
    piv_k: Tensor, piv_v: Tensor, piv_w: Tensor, piv_s: Tensor, piv_c: Tensor, buf_k: Tensor, buf_v: Tensor,
    buf_s: Tensor, buf_n: Tensor, car_k: Tensor, car_v: Tensor, car_s: Tensor, car_n: Tensor, row_key: Tensor,
    row_last_used: Tensor,
    ev_k: Tensor, ev_v: Tensor, ev_score: Tensor, ev_pos: Tensor, ev_len: Tensor, steps: Tensor,
    voxel_size: float, merge_cos: float, score_gate: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
           Tensor, Tensor]:
    pool = (piv_k, piv_v, piv_w, piv_s, piv_c, buf_k, buf_v, buf_s, buf_n, car_k, car_v, car_s, car_n, row_key,
            row_last_used)
    return pool_update_impl(pool, ev_k, ev_v, ev_score, ev_pos, ev_len, steps, voxel_size, merge_cos, score_gate)


@pool_update.register_fake
def _(*inputs):
    return tuple(torch.empty_like(t) for t in inputs[: len(POOL_FIELDS)])


@torch.library.custom_op("stac::retrieve", mutates_args=())
def retrieve(
    piv_k: Tensor, piv_v: Tensor, piv_w: Tensor, piv_s: Tensor, piv_c: Tensor, buf_k: Tensor, buf_v: Tensor,
    buf_s: Tensor, buf_n: Tensor, car_k: Tensor, car_v: Tensor, car_s: Tensor, car_n: Tensor, row_key: Tensor,
    row_last_used: Tensor,
    hot_frame: Tensor, hot_pos: Tensor, hot_len: Tensor, ret_k: Tensor, ret_v: Tensor, ret_bias: Tensor,
    ret_valid: Tensor, steps: Tensor, latest_frame: Tensor,
    window: int, retrieval: int, retrieval_start_frame: int, refresh_steps: int, radius: int, include_buffer: int,
    voxel_size: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    pool = (piv_k, piv_v, piv_w, piv_s, piv_c, buf_k, buf_v, buf_s, buf_n, car_k, car_v, car_s, car_n, row_key,
            row_last_used)
    return retrieve_impl(pool, hot_frame, hot_pos, hot_len, ret_k, ret_v, ret_bias, ret_valid, steps, latest_frame,
                         window, retrieval, retrieval_start_frame, refresh_steps, radius, include_buffer, voxel_size)


@retrieve.register_fake
def _(*inputs):
    row_last_used = inputs[len(POOL_FIELDS) - 1]
    ret_k, ret_v, ret_bias, ret_valid = inputs[len(POOL_FIELDS) + 3 : len(POOL_FIELDS) + 7]
    return (torch.empty_like(ret_k), torch.empty_like(ret_v), torch.empty_like(ret_bias), torch.empty_like(ret_valid),
            torch.empty_like(row_last_used))
