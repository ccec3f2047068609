"""STAC: the temporal heavy-hitter cache plus a long-term spatial cache with retrieval (``stac``).

On top of ``heavy_hitter``, at the end of each step, in the reference's order:
- each new patch token gets a 3D position: the point head's world points and confidence sampled
  at the patch centre (bilinear resize to the patch grid; ``patch_position="mean"`` averages the
  patch instead), kept only where the confidence exceeds ``conf_threshold`` (special tokens have
  none);
- on retrieval steps (``CacheConfig.retrieves_at``: by default once the step's first frame index
  exceeds max(chunk + pinned + window + hh, 16), then every ``refresh_steps`` steps), the pivots
  of voxels near the recent window's voxels are retrieved from the pool as it was before this
  step's evictions (up to ``retrieval`` frame-equivalents per layer and head, ranked by W; raw
  buffered tokens too with ``include_buffer``) and attended in the following steps with logit
  bias log(C); ``retrieve_before_prune=False`` retrieves after this step's evictions instead;
- the hot cache is pruned; tokens it evicts go into the stream's ``VoxelPool`` (merged into
  voxel-aligned pivots) instead of being dropped; tokens without a position are dropped.
  Evictions of all layers are queued (per head in (frame, index) order) and filed in one batched
  ``VoxelPool.insert`` per step.

A head's attention mass is rescaled by its hot keys / queries: retrieved keys are not counted.

Memory is bounded: hot store (pinned + window + hh + chunk frames) + retrieved tokens (``retrieval``
frames' worth per layer and head, or what the pool can hold if less) + the pool's ``max_voxels``
rows (with their carried-over tokens); each part is reached. Given ``memory_budget_bytes``, the pool gets
what the rest leaves over. docs/stac.md relates every rule to the reference code.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import CacheGeometry, StepInfo
from .config import CacheConfig
from .heavy_hitter import HeavyHitterCache
from .slot_store import take_layers
from .token_store import LayerTokens
from .voxel_pool import VoxelPool

Retrieved = tuple[Tensor, Tensor, Tensor, Tensor]  # k [H,T,D], v [H,T,D], bias [H,T], valid [H,T]


def patch_positions(world_points: Tensor, conf: Tensor, patch_size_hw: tuple[int, int], conf_threshold: float,
                    mode: str = "centre") -> Tensor:
    """Per-patch positions [C, gh*gw, 3] (NaN where confidence is too low or points are not finite).

    "centre": the point map and its confidence resized to the patch grid bilinearly
    (align_corners=False: each patch's centre, as the reference does); "mean": averaged over the
    patch."""
    C, H, W, _ = world_points.shape
    ph, pw = patch_size_hw
    pts, cf = world_points.permute(0, 3, 1, 2).float(), conf.float().unsqueeze(1)
    if mode == "centre":
        grid = (H // ph, W // pw)
        pts = F.interpolate(pts, size=grid, mode="bilinear", align_corners=False)  # [C, 3, gh, gw]
        cf = F.interpolate(cf, size=grid, mode="bilinear", align_corners=False)[:, 0]  # [C, gh, gw]
    else:
        pts = F.avg_pool2d(pts, (ph, pw))
        cf = F.avg_pool2d(cf, (ph, pw))[:, 0]
    pts = pts.permute(0, 2, 3, 1).reshape(C, -1, 3)
    ok = (cf.reshape(C, -1) > conf_threshold) & torch.isfinite(pts).all(dim=-1)
    return torch.where(ok[..., None], pts, torch.full_like(pts, float("nan")))


class StacCache(HeavyHitterCache):
    name = "stac"
    tracks_positions = True

    def __init__(self, config: CacheConfig, geometry: CacheGeometry):
        super().__init__(config, geometry)
        self._pool: Optional[VoxelPool] = None
        # Evicted tokens waiting to be filed into the pool: [(layer, heads, k, v, score, points)],
        # all of step ``_queued_step``.
        self._queued: list[tuple] = []
        self._queued_step = 0
        self.retrieved: dict[int, Retrieved] = {}
        self.steps = 0
        self.pooled_tokens = 0
        self.dropped_tokens = 0

    @property
    def pool(self) -> Optional[VoxelPool]:
        """The voxel pool, with every queued eviction filed (so readers always see the full state)."""
        self._file_queued()
        return self._pool

    @pool.setter
    def pool(self, pool: Optional[VoxelPool]) -> None:
        self._pool = pool
        self._queued = []

    # ------------------------------------------------------------------ sizes
    def retrieved_bytes_bound(self, tokens_per_frame: int, pool_voxels: Optional[int] = None) -> int:
        """Most bytes the retrieved tokens hold: ``retrieval`` x ``tokens_per_frame`` slots per layer
        and head, as the reference's, or fewer where a pool of ``pool_voxels`` rows cannot hold
        that many retrievable tokens (``max_pivots`` per row; with ``include_buffer`` also the
        buffer, which holds at most ``buffer_size - 1`` between inserts: a full one collapses
        into a pivot). Only pivots are retrieved and only patch tokens have a position, but
        pivots come from many frames: a pool with enough of them near the recent window fills
        every slot, the special tokens' share included."""
        c, g = self.config, self.geometry
        tokens = c.retrieval * tokens_per_frame
        if pool_voxels is not None:
            tokens = min(tokens, pool_voxels * (c.max_pivots + (c.buffer_size - 1 if c.include_buffer else 0)))
        per_token = 2 * g.head_dim * g.element_size + 4 + 1  # k, v, bias float32, valid bool
        return g.num_layers * g.num_heads * tokens * per_token

    def pool_voxels(self, tokens_per_frame: int) -> int:
        """The pool's voxel cap: the configured max_voxels, lowered to fit a memory budget."""
        c, g = self.config, self.geometry
        cap = c.max_voxels
        if c.memory_budget_bytes is not None:
            per_voxel = VoxelPool.bytes_for(1, g.num_layers, g.num_heads, g.head_dim, g.dtype, c.buffer_size, c.max_pivots,
                                            c.pool_carry_slots)
            # The retrieval's share at its full slot count: the pool's size is what is being found.
            left = c.memory_budget_bytes - self.budget_reserved_bytes(tokens_per_frame) - self.retrieved_bytes_bound(tokens_per_frame)
            fits = left // per_voxel
            if fits < 1:
                raise ValueError(
                    f"memory budget {c.memory_budget_bytes} B leaves no room for the voxel pool at {tokens_per_frame} "
                    f"tokens/frame (hot cache and retrieval need {c.memory_budget_bytes - left} B, one voxel {per_voxel} B)"
                )
            cap = fits if cap is None else min(cap, fits)
        if cap is None:
            raise ValueError("the stac policy needs max_voxels or memory_budget_bytes to bound its voxel pool")
        return int(cap)

    def bytes_bound(self, tokens_per_frame: int) -> int:
        return sum(self.bound_parts(tokens_per_frame).values())

    def resting_bytes_bound(self, tokens_per_frame: int) -> int:
        parts = self.bound_parts(tokens_per_frame)
        return sum(parts.values()) - parts["hot_step_chunk"]

    def bound_parts(self, tokens_per_frame: int) -> dict[str, int]:
        """``bytes_bound`` by part: the hot store between steps (pinned + window + hh frames, keys,
        values and per-token bookkeeping), the step's chunk while the step holds it, the retrieved
        tokens and the voxel pool (at ``pool_voxels`` rows)."""
        c, g = self.config, self.geometry
        voxels = self.pool_voxels(tokens_per_frame)
        resting = self.hot_bytes_bound(tokens_per_frame, during_step=False)
        return {
            "hot_resting": resting,
            "hot_step_chunk": self.hot_bytes_bound(tokens_per_frame) - resting,
            "retrieved": self.retrieved_bytes_bound(tokens_per_frame, voxels),
            "pool": VoxelPool.bytes_for(voxels, g.num_layers, g.num_heads, g.head_dim, g.dtype, c.buffer_size,
                                        c.max_pivots, c.pool_carry_slots),
        }

    def check_budget(self, info: StepInfo) -> None:
        if self.pool is None:
            c, g = self.config, self.geometry
            self.pool = VoxelPool(
                g.num_layers, g.num_heads, g.head_dim, voxel_size=c.voxel_size, buffer_size=c.buffer_size,
                max_pivots=c.max_pivots, merge_cos=c.merge_cos, max_voxels=self.pool_voxels(info.tokens_per_frame),
                initial_voxels=min(256, self.pool_voxels(info.tokens_per_frame)), carry_slots=c.pool_carry_slots,
                dtype=g.dtype, device=g.device,
            )

    # ------------------------------------------------------------------ step
    def extra_keys(self, layer: int) -> Optional[Retrieved]:
        found = self.retrieved.get(layer)
        return found if found is not None and found[0].shape[1] > 0 else None

    def end_step(self, info: StepInfo) -> None:
        if info.world_points is None or info.world_points_conf is None:
            raise ValueError("the stac policy needs the point head's world points at the end of each step")
        self._attach_positions(info)
        c = self.config
        self.steps += 1
        latest = info.frame_offset + info.num_frames - 1
        retrieve = c.retrieves_at(info.frame_offset, info.num_frames, self.steps)
        if retrieve and c.retrieve_before_prune:  # the pool as it was before this step's evictions
            self._retrieve(info, latest)
        super().end_step(info)  # prunes; evicted tokens arrive in on_evict (queued)
        self._file_queued()
        if retrieve and not c.retrieve_before_prune:
            self._retrieve(info, latest)

    def _attach_positions(self, info: StepInfo) -> None:
        C, P, psi = info.num_frames, info.tokens_per_frame, info.patch_start_idx
        H, W = info.world_points.shape[2:4]
        gh, gw = info.grid_hw
        patches = patch_positions(info.world_points[0], info.world_points_conf[0], (H // gh, W // gw),
                                  self.config.conf_threshold, self.config.patch_position)
        pos = torch.full((C, P, 3), float("nan"), device=patches.device)
        pos[:, psi:] = patches
        pos = pos.reshape(1, C * P, 3)
        for store in self.layers.values():
            store.write_new_positions(pos.to(store.position.device))

    def _voxels(self, points: Tensor) -> tuple[Tensor, Tensor]:
        # Confidence was already applied when positions were attached (NaN = no position).
        always = torch.zeros(points.shape[:1], device=points.device)
        return VoxelPool.voxel_coords(points, always, self.config.voxel_size, -1.0)

    def on_evict(self, layer: int, store: LayerTokens, heads: Tensor, tokens: Tensor, info: StepInfo) -> None:
        # Gather now (the store is replaced after pruning); file later, all layers at once.
        if self._queued_step != self.steps:
            self._file_queued()
            self._queued_step = self.steps
        # Filed in (frame, index) order per head, as end_step hands them over and the reference
        # pools them (arrival order decides ties).
        self._queued.append((layer, heads, *store.take(heads, tokens)))

    def on_evict_layers(self, layers: list[int], stores: list, evict: Tensor, info: StepInfo) -> None:
        """Slot stores: every layer's evicted tokens taken at once (one gather per field, not one per
        layer), queued in the order ``on_evict`` queues a compact store's (layer, head, time)."""
        taken = take_layers(stores, evict)
        if self._queued_step != self.steps:
            self._file_queued()
            self._queued_step = self.steps
        L, H, E = evict.shape
        layer_ids = torch.arange(L, device=evict.device).view(L, 1, 1).expand(L, H, E).reshape(-1)
        heads = torch.arange(H, device=evict.device).view(1, H, 1).expand(L, H, E).reshape(-1)
        self._queued.append((layer_ids, heads, *taken))

    def _file_queued(self) -> None:
        """One batched insert of every queued eviction (all layers) into the pool."""
        queued, self._queued = self._queued, []
        if not queued:
            return
        # (an entry's layer: one int, or one per token where all layers were queued at once)
        layers = torch.cat([q[0] if isinstance(q[0], Tensor) else torch.full_like(q[1], q[0]) for q in queued])
        heads, k, v, score, points = (torch.cat([q[i] for q in queued]) for i in range(1, 6))
        coords, valid = self._voxels(points)
        kept = valid.nonzero().squeeze(1)  # one synchronisation per step, for all six selections
        n_valid = kept.numel()
        self.dropped_tokens += valid.numel() - n_valid
        self.pooled_tokens += n_valid
        if n_valid:
            # Layers, heads and in-range voxels come from this cache: no value checks (syncs).
            self._pool.insert(layers[kept], heads[kept], k[kept], v[kept], score[kept], coords[kept],
                              self._queued_step, check_values=False)

    def _retrieve(self, info: StepInfo, latest: int) -> None:
        frame, position = next(iter(self.layers.values())).head_tokens(0)
        coords, valid = self._voxels(position)
        valid &= frame > latest - self.config.window  # the recent window's tokens
        valid &= frame >= 0  # not a free slot (store="slots"); always true otherwise
        budget = self.config.retrieval * info.tokens_per_frame
        layers = list(self.layers)
        # Masks, not selections: no host synchronisation until the result sizes, so this queues
        # behind the insert still running on the GPU.
        found = self.pool.retrieve_layers(layers, coords, budget, self.steps, self.config.retrieval_radius,
                                          self.config.include_buffer, query_valid=valid)
        self.retrieved = dict(zip(layers, found))

    def absorb(self, layer: int, mass: Optional[Tensor], num_queries: int) -> None:
        """As ``heavy_hitter``, but a head's key mass is rescaled by its hot keys (stored + new) /
        queries: retrieved keys are not counted, as in the reference."""
        old, n_extra, new, valid = self._pending.pop(layer)
        score = mass * ((old + new) / num_queries)
        self.layers[layer].absorb_scores(score, old, n_extra, self.config.gamma)

    # ------------------------------------------------------------------ memory
    def memory_bytes(self) -> int:
        retrieved = sum(t.numel() * t.element_size() for r in self.retrieved.values() for t in r)
        return super().memory_bytes() + retrieved + (self._pool.memory_bytes() if self._pool is not None else 0)

    def reset(self) -> None:
        super().reset()
        self.pool = None
        self.retrieved = {}
        self.steps = self.pooled_tokens = self.dropped_tokens = 0

    def stats(self) -> dict:
        out = super().stats()
        out.update(pooled_tokens=self.pooled_tokens, unpositioned_dropped=self.dropped_tokens,
                   retrieved_per_head=max((r[0].shape[1] for r in self.retrieved.values()), default=0))
        if self.pool is not None:
            out.update({f"pool_{k}": v for k, v in self.pool.stats().items()})
        return out

    # ------------------------------------------------------------------ state
    _COUNTERS = ("steps", "pooled_tokens", "dropped_tokens")

    def export_state(self) -> dict[str, Tensor]:
        """The heavy-hitter state (with ``hot_pos``), the retrieved tokens ``ret_k``/``ret_v``
        [L, H, T, D], ``ret_bias``/``ret_valid`` [L, H, T] (layer l's own T is ``ret_len[l]``; the
        rest is padding), the counters ``steps``, ``pooled_tokens``, ``dropped_tokens`` and, once
        the first step made it, the voxel pool: ``pool_max_voxels`` and ``pool_<name>`` for each
        tensor of ``VoxelPool.export_state``."""
        state = super().export_state()
        g = self.geometry
        layers = sorted(self.retrieved)
        if layers != list(range(len(layers))):
            raise RuntimeError(f"cannot export retrieved tokens of layers {layers}: expected 0 .. {len(layers) - 1}")
        lengths = [self.retrieved[i][0].shape[1] for i in layers]
        T = max(lengths, default=0)
        L, H, D, dev = len(layers), g.num_heads, g.head_dim, g.device
        ret_k = torch.zeros(L, H, T, D, dtype=g.dtype, device=dev)
        ret_v = torch.zeros(L, H, T, D, dtype=g.dtype, device=dev)
        ret_bias = torch.full((L, H, T), float("-inf"), device=dev)
        ret_valid = torch.zeros(L, H, T, dtype=torch.bool, device=dev)
        for i, n in zip(layers, lengths):
            k, v, bias, valid = self.retrieved[i]
            ret_k[i, :, :n], ret_v[i, :, :n], ret_bias[i, :, :n], ret_valid[i, :, :n] = k, v, bias, valid
        state.update(ret_k=ret_k, ret_v=ret_v, ret_bias=ret_bias, ret_valid=ret_valid,
                     ret_len=torch.tensor(lengths, dtype=torch.int64))
        for name in self._COUNTERS:
            state[name] = torch.tensor(getattr(self, name), dtype=torch.int64)
        if self.pool is not None:
            state["pool_max_voxels"] = torch.tensor(self._pool.max_voxels, dtype=torch.int64)
            state.update({"pool_" + name: t for name, t in self._pool.export_state().items()})
        return state

    def import_state(self, state: dict[str, Tensor]) -> None:
        own = ("ret_k", "ret_v", "ret_bias", "ret_valid", "ret_len") + self._COUNTERS
        missing = [n for n in own if n not in state]
        if missing:
            raise ValueError(f"{self.name} state: missing {missing}")
        pool_state = {name[5:]: t for name, t in state.items() if name.startswith("pool_") and name != "pool_max_voxels"}
        super().import_state({n: t for n, t in state.items() if n not in own and not n.startswith("pool_")})
        dev = self.geometry.device
        # Every layer of the last retrieval, an empty one (T = 0) included: the exported state and
        # the stats read the same after the import.
        names = ("ret_k", "ret_v", "ret_bias", "ret_valid")
        self.retrieved = {i: tuple(state[name][i, :, :n].to(dev).clone() for name in names)
                          for i, n in enumerate(state["ret_len"].tolist())}
        for name in self._COUNTERS:
            setattr(self, name, int(state[name]))
        self._queued_step = self.steps
        if "pool_max_voxels" in state:
            c, g = self.config, self.geometry
            pool = VoxelPool(
                g.num_layers, g.num_heads, g.head_dim, voxel_size=c.voxel_size, buffer_size=c.buffer_size,
                max_pivots=c.max_pivots, merge_cos=c.merge_cos, max_voxels=int(state["pool_max_voxels"]),
                initial_voxels=1, carry_slots=c.pool_carry_slots, dtype=g.dtype, device=g.device,
            )
            pool.import_state(pool_state)
            self.pool = pool
        elif pool_state:
            raise ValueError(f"{self.name} state: pool tensors without pool_max_voxels")
