"""STAC's working temporal cache: tokens kept by decayed cumulative attention (``heavy_hitter``).

Every cached token carries a score per (layer, head). Each step, the attention mass a key receives
(summed over the step's queries, rescaled by live keys / queries) is added to its score after the
old score decays by gamma. After the step, independently per (layer, head): the pinned frames and
the most recent ``window`` frames are kept whole, and of the rest the ``hh`` frame-equivalents with
the highest scores. So a head holds at most (pinned + window + hh + chunk) frame-equivalents.

Subclasses (the ``stac`` policy) receive the evicted tokens through ``on_evict`` and may add extra
keys (retrieved pivots, with a logit bias) through ``extra_keys``.

With ``CacheConfig.store="slots"`` each layer's store is a ``SlotLayerTokens``: preallocated at
its resting bound and written in place, not in time order, with a step's new tokens staged beside
it until the step's end. Everything that needs an order here (ties of the ranking, the order
evictions are handed over, the exported state) uses (frame, in-frame index), which is the compact
store's order, so both stores keep and hand over the same tokens.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import CacheGeometry, CachePolicy, KeySet, StepInfo, check_state_names
from .camera import camera_budget_share
from .config import CacheConfig
from .slot_store import SlotArena, SlotLayerTokens, combined_layers, commit_layers, time_order
from .token_store import LayerTokens, bytes_per_token, export_layers, import_layers, step_token_ids

MUST_KEEP = float("inf")


def extra_bias_and_valid(extra: tuple[Tensor, Tensor, Tensor, Tensor], start: int, total: int) -> tuple[Tensor, Tensor]:
    """Logit bias [H, total] and key-valid mask of a key set whose extra keys (k, v, bias, valid)
    sit at ``start``: zero bias and valid everywhere else."""
    H, n_extra = extra[2].shape
    device = extra[2].device
    bias = torch.zeros(H, total, device=device)
    bias[:, start : start + n_extra] = extra[2].float()
    valid = torch.ones(H, total, dtype=torch.bool, device=device)
    valid[:, start : start + n_extra] = extra[3]
    return bias, valid


class HeavyHitterCache(CachePolicy):
    name = "heavy_hitter"
    tracks_positions = False

    def __init__(self, config: CacheConfig, geometry: CacheGeometry):
        self.config = config
        self.geometry = geometry
        self.layers: dict[int, LayerTokens | SlotLayerTokens] = {}
        self.slots = config.store == "slots"
        self._arena: Optional[SlotArena] = None  # the slot stores' buffers (store="slots")
        self.evicted_tokens = 0
        self._step: Optional[StepInfo] = None
        self._pending: dict[int, tuple] = {}  # layer -> what absorb() needs from prepare()
        self._new_ids: Optional[tuple] = None  # the step's new-token ids, made once for every layer

    # ------------------------------------------------------------------ step
    def begin_step(self, info: StepInfo) -> None:
        self._step = info
        self._new_ids = None
        self.check_budget(info)

    def extra_keys(self, layer: int) -> Optional[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Extra (k [H,T,D], v, bias [H,T], valid [H,T]) attended this step; none here."""
        return None

    def prepare(self, layer: int, k: Tensor, v: Tensor) -> KeySet:
        if self._step is None:
            raise RuntimeError("begin_step() must be called before attention")
        if self.slots:
            return self._prepare_slots(layer, k, v)
        H, M = k.shape[0], k.shape[1]
        store = self.layers.get(layer)
        old = 0 if store is None else store.num_tokens
        extra = self.extra_keys(layer)
        n_extra = 0 if extra is None else extra[0].shape[1]
        # Store the new tokens now (their scores arrive in absorb).
        frame, index, position = self._step_new_ids(H, M, k.device)
        placeholder = torch.empty(H, M, device=k.device)  # filled in absorb()
        if store is None:  # the store keeps these tensors: its own copies (positions are written in place)
            store = self.layers[layer] = LayerTokens(k, v, frame.clone(), index.clone(), placeholder,
                                                     None if position is None else position.clone())
        else:
            store.append(k, v, frame, index, placeholder, position)
        # The key set is (stored, extra, new): views of the store around the extra keys, joined
        # only where the attention needs one tensor (a single stream), never copied twice.
        keys, values = store.k, store.v
        bias = valid = None
        if n_extra:
            keys = (store.k[:, :old], extra[0].to(k.dtype), store.k[:, old:])
            values = (store.v[:, :old], extra[1].to(v.dtype), store.v[:, old:])
            bias, valid = extra_bias_and_valid(extra, old, old + n_extra + M)
        self._pending[layer] = (old, n_extra, M, valid)
        # absorb() reads the mass of the stored and the new keys, not of the extra ones
        return KeySet(keys, values, bias, valid, need_mass=True, mass_skip=(old, old + n_extra) if n_extra else None,
                      mass_query_stride=self.config.mass_query_stride)

    def _slot_store(self, layer: int, k: Tensor) -> SlotLayerTokens:
        """The layer's slot store, made at the first step (or from an imported compact store) as a
        layer of the stream's arena."""
        store = self.layers.get(layer)
        capacity = self.hot_frames(during_step=False) * self._step.tokens_per_frame
        if isinstance(store, SlotLayerTokens) and store.capacity == capacity:
            return store
        if self._arena is None or self._arena.capacity != capacity:
            self._arena = SlotArena(self.geometry.num_layers, k.shape[0], capacity, k.shape[2], k.dtype, k.device,
                                    self.tracks_positions)
        fresh = self._arena.layer(layer)
        if isinstance(store, SlotLayerTokens):
            store = store.compact()  # an imported layout of other frame sizes: its tokens, in time order
        if store is not None:
            fresh = SlotLayerTokens.from_tokens(store, capacity, into=fresh)
        self.layers[layer] = fresh
        return fresh

    def _prepare_slots(self, layer: int, k: Tensor, v: Tensor) -> KeySet:
        """``prepare`` on a slot store: the new tokens are staged beside it; the key set is (slots,
        extra, new) as segments, the slots shown whole (with a mask of live slots where some are
        free) or as the prefix they fill. Nothing of the store is copied."""
        H, M = k.shape[0], k.shape[1]
        store = self._slot_store(layer, k)
        old = store.num_tokens
        frame, index, position = self._step_new_ids(H, M, k.device)
        store.stage(k, v, frame, index, position)
        keys, values, live = store.keys()
        staged = store.staged
        extra = self.extra_keys(layer)
        n, n_extra = keys.shape[1], (0 if extra is None else extra[0].shape[1])
        if n_extra == 0:
            valid = None
            if live is not None:
                valid = torch.ones(H, n + M, dtype=torch.bool, device=k.device)
                valid[:, :n] = live
            # absorb() counts old + new live keys (no mask needed for that)
            self._pending[layer] = (old, 0, M, None)
            return KeySet((keys, staged.k), (values, staged.v), None, valid, need_mass=True,
                          mass_query_stride=self.config.mass_query_stride)
        bias, valid = extra_bias_and_valid(extra, n, n + n_extra + M)
        if live is not None:
            valid[:, :n] = live
        self._pending[layer] = (old, n_extra, M, valid)
        return KeySet((keys, extra[0].to(k.dtype), staged.k), (values, extra[1].to(v.dtype), staged.v), bias, valid,
                      need_mass=True, mass_skip=(n, n + n_extra), mass_query_stride=self.config.mass_query_stride)

    def _step_new_ids(self, H: int, M: int, device) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Frame and in-frame index [H, M] of the step's new tokens and their (not yet known, NaN)
        positions: the same for every layer, so made once per step (the layers' stores copy them)."""
        key = (H, M, str(device))
        if self._new_ids is None or self._new_ids[0] != key:
            info = self._step
            frame, index = step_token_ids(H, info.frame_offset, info.num_frames, info.tokens_per_frame, device)
            position = torch.full((H, M, 3), float("nan"), device=device) if self.tracks_positions else None
            self._new_ids = (key, frame, index, position)
        return self._new_ids[1:]

    def absorb(self, layer: int, mass: Optional[Tensor], num_queries: int) -> None:
        old, n_extra, new, valid = self._pending.pop(layer)
        # Without a valid mask every key of the set is a stored or a new token: old + new of them.
        live = valid.sum(dim=1, keepdim=True).float() if valid is not None else float(old + new)
        score = mass * (live / num_queries)  # rescaled by live keys / queries
        self.layers[layer].absorb_scores(score, old, n_extra, self.config.gamma)

    def end_step(self, info: StepInfo) -> None:
        latest = info.frame_offset + info.num_frames - 1
        P = info.tokens_per_frame
        budget = self.config.hh * P
        # Protected tokens (pinned frames + the recent window, always whole frames) are counted on
        # the host from frame indices, so pruning needs no device->host synchronisation.
        window_frames = min(self.config.window, latest + 1)
        pinned_outside = sum(1 for f in set(self.config.pinned_frames) if f <= latest - self.config.window)
        n_protected = P * (window_frames + pinned_outside)
        # Every layer stores the same number of tokens each step, so the per-(layer, head) rankings
        # are one batched sort instead of one per layer.
        layers = sorted(self.layers)
        stores = [self.layers[layer] for layer in layers]
        n_tokens = stores[0].num_tokens if stores else 0
        if any(store.num_tokens != n_tokens for store in stores):
            raise RuntimeError("heavy_hitter: layers hold different numbers of tokens")
        n_keep = n_protected + min(budget, n_tokens - n_protected)
        if stores and self.slots:
            if n_keep < n_tokens:
                self._prune_slots(info, latest, n_keep, layers, stores)
            else:
                commit_layers(stores)  # nothing to evict: the step's tokens move into free slots
        elif stores and n_keep < n_tokens:
            _, priority = self._priority(stores, latest)
            order = torch.argsort(priority, dim=-1, descending=True, stable=True)
            keep = order[..., :n_keep].sort(dim=-1).values
            evict = order[..., n_keep:].sort(dim=-1).values  # store (time) order per head, all layers at once
            heads = torch.arange(evict.shape[1], device=evict.device).repeat_interleave(evict.shape[2])
            for i, (layer, store) in enumerate(zip(layers, stores)):
                self.on_evict(layer, store, heads, evict[i].reshape(-1), info)
                self.evicted_tokens += evict[i].numel()
                self.layers[layer] = store.select(keep[i])
        self._step = None
        self._new_ids = None

    def _priority(self, stores: list, latest: int) -> tuple[Tensor, Tensor]:
        """Frames [L, H, N] of every layer's tokens and their ranking priority: MUST_KEEP for the
        protected ones (pinned frames, the recent window), the decayed attention score otherwise."""
        frame = torch.stack([store.frame for store in stores])
        score = torch.stack([store.score for store in stores])
        return frame, torch.where(self._protected(frame, latest), torch.full_like(score, MUST_KEEP), score)

    def _protected(self, frame: Tensor, latest: int) -> Tensor:
        """Tokens of the pinned frames and of the recent window: never evicted."""
        protected = frame > latest - self.config.window
        for f in self.config.pinned_frames:
            protected |= frame == f
        return protected

    def _prune_slots(self, info: StepInfo, latest: int, n_keep: int, layers: list[int],
                     stores: list[SlotLayerTokens]) -> None:
        """``end_step``'s pruning on slot stores: the same ranking over the slots and the staged
        tokens together, in (frame, index) order, so ties break as on the compact store (whose order
        that is); evicted slots are only marked free and the kept staged tokens fill free slots."""
        n_tokens = stores[0].num_tokens
        frame = combined_layers(stores, "frame")  # [L, H, S + 1 + M]
        index = combined_layers(stores, "index")
        score = combined_layers(stores, "score")
        priority = torch.where(self._protected(frame, latest), torch.full_like(score, MUST_KEEP), score)
        priority = torch.where(frame >= 0, priority, torch.full_like(priority, -MUST_KEEP))  # free slots rank last
        by_time = time_order(frame, index)  # free slots last
        rank = torch.argsort(priority.gather(-1, by_time), dim=-1, descending=True, stable=True)
        # Ranked: kept tokens (n_keep), evicted ones (up to n_tokens), then the free slots.
        kept = by_time.gather(-1, rank[..., :n_keep])
        evict = by_time.gather(-1, rank[..., n_keep:n_tokens].sort(dim=-1).values)  # (frame, index) order per head
        self.on_evict_layers(layers, stores, evict, info)
        self.evicted_tokens += evict.numel()
        commit_layers(stores, kept, evict)

    def on_evict_layers(self, layers: list[int], stores: list[SlotLayerTokens], evict: Tensor, info: StepInfo) -> None:
        """What ``on_evict`` is for slot stores, for every layer at once: ``evict`` [L, H, E] indexes
        the space of ``slot_store.combined_layers`` (slots, then staged tokens), in (frame, in-frame
        index) order per head; ``slot_store.take_layers`` reads the tokens. Dropped here; ``stac``
        pools them."""

    def on_evict(self, layer: int, store: LayerTokens, heads: Tensor, tokens: Tensor, info: StepInfo) -> None:
        """Evicted tokens of a compact store are dropped here; ``stac`` pools them
        (``store.take(heads, tokens)``). ``heads``/``tokens``: the head and the index into ``store``
        of each evicted token, head by head, and within a head in (frame, in-frame index) order.
        Slot stores hand their evictions to ``on_evict_layers`` instead."""

    # ------------------------------------------------------------------ memory
    def hot_frames(self, during_step: bool = True) -> int:
        """Frame-equivalents per (layer, head) the hot store holds at most: pinned + window + hh,
        plus the chunk during a step."""
        frames = len(self.config.pinned_frames) + self.config.window + self.config.hh
        return frames + (self.config.chunk if during_step else 0)

    def hot_bytes_bound(self, tokens_per_frame: int, during_step: bool = True) -> int:
        """Most bytes the hot store holds: during a step, (pinned + window + hh + chunk)
        frame-equivalents per (layer, head), each token with its score (and position); between
        steps (``during_step=False``) the chunk's share is pruned away again. A slot store has one
        slot more per (layer, head), its sink."""
        g = self.geometry
        tokens = self.hot_frames(during_step) * tokens_per_frame + (1 if self.slots else 0)
        per_token = bytes_per_token(g.head_dim, g.element_size, with_score=True, with_position=self.tracks_positions)
        return g.num_layers * g.num_heads * tokens * per_token

    def bytes_bound(self, tokens_per_frame: int) -> int:
        """Most bytes this policy ever holds for a stream of frames of this size."""
        return self.hot_bytes_bound(tokens_per_frame)

    def resting_bytes_bound(self, tokens_per_frame: int) -> int:
        """Most bytes this policy holds between steps."""
        return self.hot_bytes_bound(tokens_per_frame, during_step=False)

    def budget_reserved_bytes(self, tokens_per_frame: int) -> int:
        """What a memory budget must leave for the fixed part: the hot store and the camera cache."""
        return self.hot_bytes_bound(tokens_per_frame) + camera_budget_share(self.config, self.geometry)

    def check_budget(self, info: StepInfo) -> None:
        """Refuse, before any work, a memory budget the fixed part of the cache cannot fit."""
        budget = self.config.memory_budget_bytes
        if budget is None:
            return
        need = self.budget_reserved_bytes(info.tokens_per_frame)
        if need > budget:
            raise ValueError(
                f"memory budget {budget} B is too small for the {self.name} cache at {info.tokens_per_frame} tokens/frame: "
                f"pinned + window + hh + chunk frames and the camera cache need {need} B; lower window/hh or raise the budget"
            )

    def memory_bytes(self) -> int:
        return sum(s.memory_bytes() for s in self.layers.values())

    def reset(self) -> None:
        self.layers.clear()
        self._arena = None
        self._step = None
        self._new_ids = None
        self.evicted_tokens = 0

    def stats(self) -> dict:
        tokens = next(iter(self.layers.values())).num_tokens if self.layers else 0
        return {"memory_bytes": self.memory_bytes(), "tokens_per_head": tokens, "evicted_tokens": self.evicted_tokens}

    # ------------------------------------------------------------------ state
    def export_state(self) -> dict[str, Tensor]:
        """``hot_k``/``hot_v`` [L, H, N, D], ``hot_frame``/``hot_index``/``hot_score`` [L, H, N]
        (``hot_pos`` [L, H, N, 3] where positions are tracked) and ``evicted_tokens``; from slot
        stores also their layout: ``hot_slot`` [L, H, N] int32 (each token's slot) and
        ``hot_capacity`` (0-d), so that a slot store continues bit for bit after an import."""
        if self._step is not None or self._pending:
            raise RuntimeError("export_state() is only valid between steps")
        g = self.geometry
        # A slot store exports its live tokens in (frame, index) order: the compact store's state.
        slot_stores = [self.layers[i] for i in sorted(self.layers) if isinstance(self.layers[i], SlotLayerTokens)]
        layers = {i: s.compact() if isinstance(s, SlotLayerTokens) else s for i, s in self.layers.items()}
        state = export_layers(layers, g.num_heads, g.head_dim, g.dtype, g.device, True, self.tracks_positions)
        state["evicted_tokens"] = torch.tensor(self.evicted_tokens, dtype=torch.int64)
        if slot_stores and len(slot_stores) == len(self.layers):
            state["hot_slot"] = torch.stack([s.occupied_slots().to(torch.int32) for s in slot_stores])
            state["hot_capacity"] = torch.tensor(slot_stores[0].capacity, dtype=torch.int64)
        return state

    def import_state(self, state: dict[str, Tensor]) -> None:
        """A state of either store. A slot store's layout (``hot_slot``, ``hot_capacity``) is restored
        where this cache keeps slot stores too, and ignored by a compact one (both continue with the
        same tokens; only the slot layout makes the attention sum its keys in the original order)."""
        names = ["hot_k", "hot_v", "hot_frame", "hot_index", "hot_score", "evicted_tokens"]
        check_state_names(self.name, state, names + (["hot_pos"] if self.tracks_positions else []),
                          optional=("hot_slot", "hot_capacity"))
        if ("hot_slot" in state) != ("hot_capacity" in state):
            raise ValueError(f"{self.name} state: hot_slot and hot_capacity come together")
        g = self.geometry
        layers = import_layers(state, g.num_heads, g.head_dim, g.device, True, self.tracks_positions)
        arena = None
        if self.slots and "hot_slot" in state:
            slots, capacity = state["hot_slot"], int(state["hot_capacity"])
            if tuple(slots.shape) != tuple(state["hot_frame"].shape):
                raise ValueError(f"{self.name} state: hot_slot {tuple(slots.shape)} must match hot_frame "
                                 f"{tuple(state['hot_frame'].shape)}")
            if len(layers) != g.num_layers:
                raise ValueError(f"{self.name} state: {len(layers)} layers, the model has {g.num_layers}")
            arena = SlotArena(g.num_layers, g.num_heads, capacity, g.head_dim, state["hot_k"].dtype, g.device,
                              self.tracks_positions)
            layers = {i: SlotLayerTokens.from_tokens(store, capacity, slots[i], into=arena.layer(i))
                      for i, store in layers.items()}
        self.reset()
        self.layers = layers  # compact ones become slot stores at the next step (in time order)
        self._arena = arena
        self.evicted_tokens = int(state["evicted_tokens"])
