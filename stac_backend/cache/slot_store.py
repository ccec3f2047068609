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


class StagedTokens:
    """A step's new tokens of one layer, beside the store until the step's end [H, M, ...]."""

    def __init__(self, k: Tensor, v: Tensor, frame: Tensor, index: Tensor, position: Optional[Tensor]):
        self.k, self.v = k, v
        self.frame, self.index = frame, index
        self.score = torch.zeros(frame.shape, device=k.device)  # set by absorb_scores
        self.position = position  # [H, M, 3] or None; written at the step's end

    @property
    def num_tokens(self) -> int:
        return self.k.shape[1]

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.k, self.v, self.frame, self.index, self.score, self.position) if t is not None]


class SlotLayerTokens:
    def __init__(self, k: Tensor, v: Tensor, frame: Tensor, index: Tensor, score: Tensor, position: Optional[Tensor],
                 num_tokens: int, prefix: bool):
        self.k, self.v = k, v  # [H, S + 1, D]: S = capacity, plus the sink slot
        self.frame = frame  # [H, S + 1] int32; FREE for a free slot (the sink is always FREE)
        self.index = index  # [H, S + 1] int32
        self.score = score  # [H, S + 1] float32
        self.position = position  # [H, S + 1, 3] float32, or None
        self._num_tokens = num_tokens  # live tokens per head in the slots (every head holds the same number)
        self.prefix = prefix  # live slots are exactly 0 .. num_tokens - 1 in every head
        self.staged: Optional[StagedTokens] = None  # the step's new tokens, until commit()
        self.attended = 0  # slots in the last key set (a prefix, or every slot)

    @classmethod
    def empty(cls, num_heads: int, capacity: int, head_dim: int, dtype: torch.dtype, device,
              with_position: bool) -> "SlotLayerTokens":
        H, S = num_heads, capacity + 1
        position = torch.full((H, S, 3), float("nan"), device=device) if with_position else None
        return cls(torch.zeros(H, S, head_dim, dtype=dtype, device=device), torch.zeros(H, S, head_dim, dtype=dtype, device=device),
                   torch.full((H, S), FREE, dtype=torch.int32, device=device), torch.zeros(H, S, dtype=torch.int32, device=device),
                   torch.zeros(H, S, device=device), position, 0, True)

    @classmethod
    def from_tokens(cls, store: LayerTokens, capacity: int, slots: Optional[Tensor] = None) -> "SlotLayerTokens":
        """A slot store holding ``store``'s tokens: in the slots ``slots`` [H, n] (each token's slot,
        as ``occupied_slots`` recorded them), or else in the first slots in order (e.g. an imported
        compact state)."""
        H, n, D = store.k.shape
        if n > capacity:
            raise RuntimeError(f"slot store: {n} tokens per head exceed its capacity of {capacity}")
        out = cls.empty(H, capacity, D, store.k.dtype, store.k.device, store.position is not None)
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
        """Hold a step's new tokens [H, M, ...] beside the store until ``commit`` (their scores arrive
        in ``absorb_scores``, their positions in ``write_new_positions``). k and v are copied: the
        caller's tensors may be views of a larger activation that should not outlive the layer. The
        ids and positions are kept as given: staged fields are only read, or replaced whole."""
        if self.staged is not None:
            raise RuntimeError("slot store: a step's tokens are already staged (commit() was not called)")
        self.staged = StagedTokens(k.clone(memory_format=torch.contiguous_format),
                                   v.clone(memory_format=torch.contiguous_format), frame, index, position)

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
    def combined(self, name: str) -> Tensor:
        """Field ``name`` of the slots (sink included) followed by the staged tokens' [H, S + 1 + M, ...]:
        the token space ``commit`` and ``take`` index (bookkeeping fields only: small)."""
        return torch.cat([getattr(self, name), getattr(self.staged, name)], dim=1)

    def take(self, heads: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """k, v, score and position of (head, token) pairs in the combined space (slots, then
        staged tokens at ``S + 1 + j``)."""
        first_new = self.capacity + 1
        is_new = tokens >= first_new
        slot, new = tokens.clamp(max=first_new - 1), (tokens - first_new).clamp(min=0)

        def pick(mine: Optional[Tensor], staged: Optional[Tensor]) -> Optional[Tensor]:
            if mine is None:
                return None
            a, b = mine[heads, slot], staged[heads, new]
            return torch.where(is_new.view(-1, *([1] * (a.dim() - 1))), b, a)

        st = self.staged
        return pick(self.k, st.k), pick(self.v, st.v), pick(self.score, st.score), pick(self.position, st.position)

    def head_tokens(self, head: int) -> tuple[Tensor, Tensor]:
        """Frame [S + 1 (+ M)] and position [.., 3] of every slot of one head (free ones have frame
        FREE) and, during a step, of its staged tokens."""
        frame, position = self.frame[head], self.position[head]
        if self.staged is None:
            return frame, position
        return torch.cat([frame, self.staged.frame[head]]), torch.cat([position, self.staged.position[head]])

    def commit(self, kept: Optional[Tensor] = None, evicted: Optional[Tensor] = None) -> None:
        """End the step: ``evicted`` [H, E] (combined indices) leave, ``kept`` [H, K] (combined
        indices, K = the tokens per head from now on) stay; the kept staged tokens move into free
        slots (lowest first). Without ``kept`` every staged token is kept (no pruning this step)."""
        staged, S = self.staged, self.capacity
        first_new = S + 1
        H, M = staged.frame.shape
        if evicted is not None and evicted.shape[1]:
            # Evicted staged tokens map to the sink, which stays free.
            self.frame.scatter_(1, evicted.clamp(max=S), FREE)
            self.prefix = False
        if kept is None:
            stays = torch.ones(H, M, dtype=torch.bool, device=self.k.device)
            n_tokens = self._num_tokens + M
        else:
            mark = torch.zeros(H, first_new + M, dtype=torch.bool, device=self.k.device)
            stays = mark.scatter_(1, kept, True)[:, first_new:]
            n_tokens = kept.shape[1]
        # Free slots first, lowest first (the sink counts as taken): staged token j, the r-th kept
        # one of its head, goes to its head's r-th free slot; tokens not kept go to the sink.
        taken = self.frame >= 0
        taken[:, S] = True
        free_first = torch.argsort(taken.to(torch.int8), dim=1, stable=True)
        rank = (torch.cumsum(stays.to(torch.int32), dim=1) - 1).clamp(min=0).long()
        dest = torch.where(stays, free_first.gather(1, rank), torch.full_like(rank, S))
        rows = dest.unsqueeze(-1)
        self.k.scatter_(1, rows.expand(-1, -1, self.k.shape[2]), staged.k)
        self.v.scatter_(1, rows.expand(-1, -1, self.v.shape[2]), staged.v)
        self.frame.scatter_(1, dest, staged.frame)
        self.index.scatter_(1, dest, staged.index)
        self.score.scatter_(1, dest, staged.score)
        if self.position is not None:
            self.position.scatter_(1, rows.expand(-1, -1, 3), staged.position)
        self.frame[:, S] = FREE
        self._num_tokens = n_tokens
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
