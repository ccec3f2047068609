"""A layer's hot store preallocated at its resting bound and written in place (``CacheConfig.store="slots"``).

The compact store (``LayerTokens``) joins old and new tokens with ``torch.cat`` every step and,
after pruning, gathers the kept tokens into new tensors: two copies of the whole store per step.
Here every field is allocated once, at the most the policy keeps between steps (pinned + window +
hh frame-equivalents per head), and:

- a step's new tokens are staged beside the store (``stage``): attention reads the store and the
  staged tokens as two key segments, so nothing is joined;
- at the step's end the ranking runs over store and staged tokens together (``commit``): evicted
  slots are marked free (``frame = -1``) and the staged tokens that are kept are written into
  free slots. Only the kept new tokens move; the store never holds more than its resting bound,
  so it costs no more memory than the compact store between steps.

So the slots are not in time order. Whoever needs an order sorts by (frame, in-frame index):
``time_order`` gives it. A free slot is recognised by ``frame < 0`` (frames are >= 0).

Every buffer has one slot more than the capacity, the sink: staged tokens that are not kept
(possible only when a step has more frames than the recent window protects) are written there by
the same scatter that places the kept ones, so the scatter needs no host-side count. The sink is
never attended and never counted as a token.

While the live slots are a prefix (start of a stream, before the first eviction) attention runs
over a view of that prefix; once the store is full (the steady state) over all of it; otherwise
over all of it with a per-head key-valid mask.

A stream's layers live in one ``SlotArena`` (each field one tensor [L, H, S + 1, ...], each
layer's store a view of it, and the step's staged keys and values one [L, H, M, D] buffer), so
the end of a step (``combined_layers``, ``take_layers``, ``commit_layers``) handles every layer
with one operation per field instead of one per layer and field: the host launches a few kernels
per stream, not a few per layer.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .token_store import LayerTokens

FREE = -1  # ``frame`` of a free slot


def time_order(frame: Tensor, index: Tensor) -> Tensor:
    """Slot indices [..., S] sorted by (frame, in-frame index) along the last dim, free slots last.
    One int64 key per slot (frame in the high 32 bits), so no host synchronisation."""
    key = (frame.long() << 32) | index.long()
    key = torch.where(frame >= 0, key, torch.full_like(key, torch.iinfo(torch.int64).max))
    return torch.argsort(key, dim=-1, stable=True)


class SlotArena:
    """Every layer's slot buffers of one stream, one tensor per field [L, H, S + 1, ...]; ``layer(i)``
    is layer i's store (views). The staged keys and values of a step are one [L, H, M, D] buffer
    from the first ``stage`` of the step until ``commit_layers``."""

    def __init__(self, num_layers: int, num_heads: int, capacity: int, head_dim: int, dtype: torch.dtype, device,
                 with_position: bool):
        L, H, S = num_layers, num_heads, capacity + 1
        self.capacity = capacity
        self.k = torch.zeros(L, H, S, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(L, H, S, head_dim, dtype=dtype, device=device)
        self.frame = torch.full((L, H, S), FREE, dtype=torch.int32, device=device)
        self.index = torch.zeros(L, H, S, dtype=torch.int32, device=device)
        self.score = torch.zeros(L, H, S, device=device)
        self.position = torch.full((L, H, S, 3), float("nan"), device=device) if with_position else None
        self.staged_k: Optional[Tensor] = None
        self.staged_v: Optional[Tensor] = None

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    def layer(self, i: int) -> "SlotLayerTokens":
        if not 0 <= i < self.num_layers:
            raise ValueError(f"slot arena: layer {i} outside 0 .. {self.num_layers - 1}")
        position = None if self.position is None else self.position[i]
        return SlotLayerTokens(self.k[i], self.v[i], self.frame[i], self.index[i], self.score[i], position, 0, True,
                               arena=self, layer=i)

    def stage(self, i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Copy layer i's new keys and values [H, M, D] into the step's buffer; their views there."""
        if self.staged_k is None or self.staged_k.shape[2] != k.shape[1]:
            shape = (self.num_layers,) + tuple(k.shape)
            self.staged_k = torch.empty(shape, dtype=self.k.dtype, device=self.k.device)
            self.staged_v = torch.empty(shape, dtype=self.v.dtype, device=self.v.device)
        self.staged_k[i].copy_(k)
        self.staged_v[i].copy_(v)
        return self.staged_k[i], self.staged_v[i]

    def unstage(self) -> None:
        """The step is committed: its buffer goes (between steps the arena holds the slots only)."""
        self.staged_k = self.staged_v = None


def _commit(fields: dict, staged: dict, kept: Optional[Tensor], evicted: Optional[Tensor]) -> int:
    """The end of a step on a stream's slot buffers [L, H, ...] (any leading dims work); returns the
    tokens per head from now on (-1: the slots' count plus M).

    ``fields``: k, v [..., S + 1, D], frame, index, score [..., S + 1] and position [..., S + 1, 3]
    (or None); ``staged`` the same fields for the M staged tokens. ``evicted`` [..., E] and ``kept``
    [..., K] index the combined space (slots, then staged token j at S + 1 + j): evicted slots are
    marked free, and staged token j, the r-th kept one of its head, goes to its head's r-th free
    slot (lowest first; the sink counts as taken); tokens not kept go to the sink. Without
    ``kept`` every staged token stays."""
    frame = fields["frame"]
    S = frame.shape[-1] - 1
    M = staged["frame"].shape[-1]
    lead = frame.shape[:-1]
    if evicted is not None and evicted.shape[-1]:
        frame.scatter_(-1, evicted.clamp(max=S), FREE)  # evicted staged tokens map to the sink
    if kept is None:
        stays = torch.ones(lead + (M,), dtype=torch.bool, device=frame.device)
    else:
        mark = torch.zeros(lead + (S + 1 + M,), dtype=torch.bool, device=frame.device)
        stays = mark.scatter_(-1, kept, True)[..., S + 1 :]
    taken = frame >= 0
    taken[..., S] = True
    free_first = torch.argsort(taken.to(torch.int8), dim=-1, stable=True)
    rank = (torch.cumsum(stays.to(torch.int32), dim=-1) - 1).clamp(min=0).long()
    dest = torch.where(stays, free_first.gather(-1, rank), torch.full_like(rank, S))
    for name in ("k", "v", "frame", "index", "score", "position"):
        field = fields[name]
        if field is None:
            continue
        src = staged[name]
        index = dest if field.dim() == dest.dim() else dest.unsqueeze(-1).expand(*dest.shape, field.shape[-1])
        field.scatter_(dest.dim() - 1, index, src.expand(index.shape))
    frame[..., S] = FREE
    return -1 if kept is None else kept.shape[-1]


def _one_arena(stores: list["SlotLayerTokens"]) -> SlotArena:
    """The arena whose layers 0 .. L-1 ``stores`` are, in order, each with its step staged."""
    arena = stores[0].arena if stores else None
    if (arena is None or len(stores) != arena.num_layers or arena.staged_k is None
            or not all(store.arena is arena and store.layer == i and store.staged is not None
                       for i, store in enumerate(stores))):
        raise RuntimeError("slot stores: the end of a step needs every layer of one arena, in order, each staged")
    return arena


def _staged_of_all(stores: list["SlotLayerTokens"], name: str) -> Optional[Tensor]:
    """Staged field ``name`` of every layer [L, H, M, ...]: a view where all layers share one tensor
    (the step's ids), else stacked."""
    parts = [getattr(store.staged, name) for store in stores]
    if parts[0] is None:
        return None
    if all(p is parts[0] for p in parts):
        return parts[0].expand((len(parts),) + tuple(parts[0].shape))
    return torch.stack(parts)


def combined_layers(stores: list["SlotLayerTokens"], name: str) -> Tensor:
    """Bookkeeping field ``name`` (frame, index or score) of every layer's slots (sink included)
    followed by its staged tokens' [L, H, S + 1 + M]: the token space the end of a step indexes
    (staged token j at S + 1 + j)."""
    arena = _one_arena(stores)
    return torch.cat([getattr(arena, name), _staged_of_all(stores, name)], dim=-1)


def take_layers(stores: list["SlotLayerTokens"], tokens: Tensor) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """k, v, score and position of the tokens ``tokens`` [L, H, E] (indices into the combined space
    of ``combined_layers``) of every layer at once, flattened layer by layer, then head by head."""
    arena = _one_arena(stores)
    L, H, E = tokens.shape
    first_new = arena.capacity + 1
    layer = torch.arange(L, device=tokens.device).view(L, 1, 1).expand(L, H, E)
    head = torch.arange(H, device=tokens.device).view(1, H, 1).expand(L, H, E)
    is_new = tokens >= first_new
    slot, new = tokens.clamp(max=first_new - 1), (tokens - first_new).clamp(min=0)

    def pick(mine: Optional[Tensor], staged: Optional[Tensor]) -> Optional[Tensor]:
        if mine is None:
            return None
        a, b = mine[layer, head, slot], staged[layer, head, new]
        picked = torch.where(is_new.view(L, H, E, *([1] * (a.dim() - 3))), b, a)
        return picked.reshape(L * H * E, *a.shape[3:])

    return (pick(arena.k, arena.staged_k), pick(arena.v, arena.staged_v),
            pick(arena.score, _staged_of_all(stores, "score")), pick(arena.position, _staged_of_all(stores, "position")))


def commit_layers(stores: list["SlotLayerTokens"], kept: Optional[Tensor] = None, evicted: Optional[Tensor] = None) -> None:
    """End the step of every layer of a stream: ``evicted`` [L, H, E] (combined indices) leave,
    ``kept`` [L, H, K] (combined indices, K = the tokens per head from now on) stay, and the kept
    staged tokens move into free slots (lowest first), on the arena's [L, ...] tensors at once.
    Without ``kept`` every staged token stays (no pruning this step)."""
    arena = _one_arena(stores)
    if any(store.staged.score is None for store in stores):
        raise RuntimeError("slot stores: a staged layer has no scores (absorb_scores() was not called)")
    fields = {name: getattr(arena, name) for name in ("k", "v", "frame", "index", "score", "position")}
    staged = {"k": arena.staged_k, "v": arena.staged_v,
              **{name: _staged_of_all(stores, name) for name in ("frame", "index", "score", "position")}}
    n_tokens = _commit(fields, staged, kept, evicted)
    evicting = evicted is not None and evicted.shape[-1] > 0
    for store in stores:
        store.end_commit(n_tokens, evicting)
    arena.unstage()


class StagedTokens:
    """A step's new tokens of one layer, beside the store until the step's end [H, M, ...]."""

    def __init__(self, k: Tensor, v: Tensor, frame: Tensor, index: Tensor, position: Optional[Tensor]):
        self.k, self.v = k, v
        self.frame, self.index = frame, index
        self.score: Optional[Tensor] = None  # [H, M], set by absorb_scores
        self.position = position  # [H, M, 3] or None; written at the step's end

    @property
    def num_tokens(self) -> int:
        return self.k.shape[1]

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.k, self.v, self.frame, self.index, self.score, self.position) if t is not None]


class SlotLayerTokens:
    def __init__(self, k: Tensor, v: Tensor, frame: Tensor, index: Tensor, score: Tensor, position: Optional[Tensor],
                 num_tokens: int, prefix: bool, arena: Optional[SlotArena] = None, layer: int = 0):
        self.k, self.v = k, v  # [H, S + 1, D]: S = capacity, plus the sink slot
        self.frame = frame  # [H, S + 1] int32; FREE for a free slot (the sink is always FREE)
        self.index = index  # [H, S + 1] int32
        self.score = score  # [H, S + 1] float32
        self.position = position  # [H, S + 1, 3] float32, or None
        self._num_tokens = num_tokens  # live tokens per head in the slots (every head holds the same number)
        self.prefix = prefix  # live slots are exactly 0 .. num_tokens - 1 in every head
        self.staged: Optional[StagedTokens] = None  # the step's new tokens, until commit_layers()
        self.attended = 0  # slots in the last key set (a prefix, or every slot)
        self.arena, self.layer = arena, layer  # whose views the buffers are, and which layer of it

    @classmethod
    def empty(cls, num_heads: int, capacity: int, head_dim: int, dtype: torch.dtype, device,
              with_position: bool) -> "SlotLayerTokens":
        """A store of its own (an arena of one layer)."""
        return SlotArena(1, num_heads, capacity, head_dim, dtype, device, with_position).layer(0)

    @classmethod
    def from_tokens(cls, store: LayerTokens, capacity: int, slots: Optional[Tensor] = None,
                    into: Optional["SlotLayerTokens"] = None) -> "SlotLayerTokens":
        """A slot store holding ``store``'s tokens: in the slots ``slots`` [H, n] (each token's slot,
        as ``occupied_slots`` recorded them), or else in the first slots in order (e.g. an imported
        compact state). ``into``: an empty store of that capacity to fill (an arena's layer)."""
        H, n, D = store.k.shape
        if n > capacity:
            raise RuntimeError(f"slot store: {n} tokens per head exceed its capacity of {capacity}")
        out = into if into is not None else cls.empty(H, capacity, D, store.k.dtype, store.k.device,
                                                       store.position is not None)
        if out.capacity != capacity or out.num_tokens:
            raise RuntimeError(f"slot store: expected an empty store of capacity {capacity}")
        first = torch.arange(n, device=store.k.device).expand(H, n)
        if slots is None:
            slots = first
        else:
            slots = slots.to(device=store.k.device, dtype=torch.int64)
            ordered = slots.sort(dim=1).values
            if (tuple(slots.shape) != (H, n)
                    or n and (int(ordered[:, 0].min()) < 0 or int(ordered[:, -1].max()) >= capacity
                              or bool((ordered[:, 1:] == ordered[:, :-1]).any()))):
                raise ValueError(f"slot store: slots must be [{H}, {n}] distinct indices per head below the capacity {capacity}")
        for name in ("k", "v", "frame", "index", "score", "position"):
            src = getattr(store, name)
            if src is not None:
                idx = slots if src.dim() == 2 else slots.unsqueeze(-1).expand(-1, -1, src.shape[-1])
                getattr(out, name).scatter_(1, idx, src)
        out._num_tokens = n
        out.prefix = bool(torch.equal(slots, first))
        return out

    @property
    def num_tokens(self) -> int:
        """Tokens per head: the live slots and, during a step, the staged new tokens."""
        return self._num_tokens + (self.staged.num_tokens if self.staged is not None else 0)

    @property
    def capacity(self) -> int:
        return self.k.shape[1] - 1

    def tensors(self) -> list[Tensor]:
        own = [t for t in (self.k, self.v, self.frame, self.index, self.score, self.position) if t is not None]
        return own + (self.staged.tensors() if self.staged is not None else [])

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def live(self) -> Tensor:
        """[H, S] bool: slots holding a token (the sink excluded)."""
        return self.frame[:, : self.capacity] >= 0

    # ------------------------------------------------------------------ step
    def stage(self, k: Tensor, v: Tensor, frame: Tensor, index: Tensor, position: Optional[Tensor]) -> None:
        """Hold a step's new tokens [H, M, ...] beside the store until ``commit_layers`` (their scores arrive
        in ``absorb_scores``, their positions in ``write_new_positions``). k and v are copied: the
        caller's tensors may be views of a larger activation that should not outlive the layer. The
        ids and positions are kept as given: staged fields are only read, or replaced whole."""
        if self.staged is not None:
            raise RuntimeError("slot store: a step's tokens are already staged (commit_layers() was not called)")
        k, v = self.arena.stage(self.layer, k, v)
        self.staged = StagedTokens(k, v, frame, index, position)

    def keys(self) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """What attention sees of the slots: keys, values [H, n, D] and a key-valid mask [H, n] (None
        where every key shown is live). The staged tokens are a segment of their own."""
        if self.prefix or self._num_tokens == self.capacity:
            n = self._num_tokens
            self.attended = n
            return self.k[:, :n], self.v[:, :n], None
        self.attended = self.capacity
        return self.k[:, : self.capacity], self.v[:, : self.capacity], self.live()

    def absorb_scores(self, score: Tensor, old: int, n_extra: int, gamma: float) -> None:
        """Scores [H, attended + extra + staged] of the last key set (slots, extra keys, the staged
        tokens): decay and add for the slots, set for the staged tokens. Free slots get a
        meaningless value: they are never ranked."""
        del old
        n = self.attended
        self.score[:, :n].mul_(gamma).add_(score[:, :n])
        self.staged.score = score[:, n + n_extra :]

    def write_new_positions(self, position: Tensor) -> None:
        """Positions [1 or H, M, 3] of the staged tokens."""
        staged = self.staged
        staged.position = position.expand(staged.k.shape[0], -1, -1)

    # ------------------------------------------------------- end of step
    def head_tokens(self, head: int) -> tuple[Tensor, Tensor]:
        """Frame [S + 1 (+ M)] and position [.., 3] of every slot of one head (free ones have frame
        FREE) and, during a step, of its staged tokens."""
        frame, position = self.frame[head], self.position[head]
        if self.staged is None:
            return frame, position
        return torch.cat([frame, self.staged.frame[head]]), torch.cat([position, self.staged.position[head]])

    def end_commit(self, n_tokens: int, evicted: bool) -> None:
        """The host-side counts after ``commit_layers`` (``n_tokens`` -1: the staged tokens were all added)."""
        self._num_tokens = self._num_tokens + self.staged.num_tokens if n_tokens < 0 else n_tokens
        if evicted:
            self.prefix = False
        self.staged = None

    def occupied_slots(self) -> Tensor:
        """The slot [H, n] of each live token, in (frame, in-frame index) order per head: with
        ``compact`` it records the layout, which ``from_tokens`` restores exactly."""
        return time_order(self.frame, self.index)[:, : self._num_tokens]

    def compact(self) -> LayerTokens:
        """The live tokens as a compact store, in (frame, in-frame index) order per head (copies)."""
        order = self.occupied_slots()

        def take(t: Optional[Tensor]) -> Optional[Tensor]:
            if t is None:
                return None
            idx = order if t.dim() == 2 else order.unsqueeze(-1).expand(-1, -1, t.shape[-1])
            return torch.gather(t, 1, idx)

        return LayerTokens(take(self.k), take(self.v), take(self.frame), take(self.index), take(self.score), take(self.position))
