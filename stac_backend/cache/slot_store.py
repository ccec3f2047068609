"""A layer's hot store preallocated at its bound and written in place (``CacheConfig.store="slots"``).

The default store (``LayerTokens``) joins old and new tokens with ``torch.cat`` every step and,
after pruning, gathers the kept tokens into new tensors: two copies of the whole store per step.
Here every field is allocated once at the capacity the policy can ever hold during a step, and:

- a step's new tokens are scattered into free slots, per head (heads keep different tokens);
- eviction moves no data: it marks the slots free (``frame = -1``), and the next step's new
  tokens fill them.

So the slots are not in time order. Whoever needs an order sorts by (frame, in-frame index):
``time_order`` gives it. A free slot is recognised by ``frame < 0`` (frames are >= 0), which costs
no memory beyond the fields the default store has.

While the live slots are a prefix (start of a stream, before the first eviction) attention runs
over a view of that prefix; once the store is full (the steady state at a fixed chunk size) over
the whole buffer; otherwise over the whole buffer with a per-head key-valid mask.
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


class SlotLayerTokens:
    def __init__(self, k: Tensor, v: Tensor, frame: Tensor, index: Tensor, score: Tensor, position: Optional[Tensor],
                 free: Tensor, num_tokens: int, prefix: bool):
        self.k, self.v = k, v  # [H, S, D], S = capacity
        self.frame = frame  # [H, S] int32; FREE for a free slot
        self.index = index  # [H, S] int32
        self.score = score  # [H, S] float32
        self.position = position  # [H, S, 3] float32, or None
        self.free = free  # [H, S - num_tokens] int64: each head's free slots, taken from the front
        self._num_tokens = num_tokens  # live tokens per head (every head holds the same number)
        self.prefix = prefix  # live slots are exactly 0 .. num_tokens - 1 in every head
        self.new_slots: Optional[Tensor] = None  # [H, M] int64: the slots of the last append's tokens
        self.attended = 0  # keys of the store in the last key set (a prefix, or all slots)

    @classmethod
    def empty(cls, num_heads: int, capacity: int, head_dim: int, dtype: torch.dtype, device,
              with_position: bool) -> "SlotLayerTokens":
        H, S = num_heads, capacity
        free = torch.arange(S, device=device).expand(H, -1).contiguous()
        position = torch.full((H, S, 3), float("nan"), device=device) if with_position else None
        return cls(torch.zeros(H, S, head_dim, dtype=dtype, device=device), torch.zeros(H, S, head_dim, dtype=dtype, device=device),
                   torch.full((H, S), FREE, dtype=torch.int32, device=device), torch.zeros(H, S, dtype=torch.int32, device=device),
                   torch.zeros(H, S, device=device), position, free, 0, True)

    @classmethod
    def from_tokens(cls, store: LayerTokens, capacity: int) -> "SlotLayerTokens":
        """A slot store holding ``store``'s tokens in its first slots (e.g. an imported state)."""
        H, n, D = store.k.shape
        if n > capacity:
            raise RuntimeError(f"slot store: {n} tokens per head exceed its capacity of {capacity}")
        out = cls.empty(H, capacity, D, store.k.dtype, store.k.device, store.position is not None)
        for name in ("k", "v", "frame", "index", "score", "position"):
            src = getattr(store, name)
            if src is not None:
                getattr(out, name)[:, :n] = src
        out.free = out.free[:, n:].contiguous()
        out._num_tokens = n
        return out

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.k, self.v, self.frame, self.index, self.score, self.position) if t is not None]

    def memory_bytes(self) -> int:
        # The free-slot list is bookkeeping of at most a step's tokens; the held buffers are the
        # capacity, which is what the policy's bound counts.
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def live(self) -> Tensor:
        """[H, S] bool: slots holding a token."""
        return self.frame >= 0

    # ------------------------------------------------------------------ step
    def append(self, k: Tensor, v: Tensor, frame: Tensor, index: Tensor, position: Optional[Tensor]) -> None:
        """Write a step's tokens [H, M, ...] into free slots (their scores arrive in ``absorb_scores``)."""
        M = k.shape[1]
        if M > self.free.shape[1]:
            raise RuntimeError(f"slot store: {M} new tokens per head but {self.free.shape[1]} free slots "
                               f"(capacity {self.capacity}); more frames per step than the cache's chunk?")
        slots, self.free = self.free[:, :M], self.free[:, M:]
        self.new_slots = slots
        rows = slots.unsqueeze(-1)
        self.k.scatter_(1, rows.expand(-1, -1, k.shape[2]), k)
        self.v.scatter_(1, rows.expand(-1, -1, v.shape[2]), v)
        self.frame.scatter_(1, slots, frame)
        self.index.scatter_(1, slots, index)
        if self.position is not None:
            self.position.scatter_(1, rows.expand(-1, -1, 3), position)
        self._num_tokens += M

    def keys(self) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """What attention sees of the store: keys, values [H, n, D] and a key-valid mask [H, n] (None
        where every key shown is live)."""
        if self.prefix or self._num_tokens == self.capacity:
            n = self._num_tokens
            self.attended = n
            return self.k[:, :n], self.v[:, :n], None
        self.attended = self.capacity
        return self.k, self.v, self.live()

    def absorb_scores(self, score: Tensor, old: int, n_extra: int, gamma: float) -> None:
        """Scores [H, attended + extra] of the last key set (stored slots first): decay and add for
        the tokens held before this step, set for the ones this step wrote. Slots that are free
        get a meaningless value: they are never ranked."""
        del old, n_extra  # the slots written this step say which tokens are new
        stored = score[:, : self.attended]
        new = stored.gather(1, self.new_slots)
        self.score[:, : self.attended].mul_(gamma).add_(stored)
        self.score.scatter_(1, self.new_slots, new)

    def write_new_positions(self, position: Tensor) -> None:
        """Positions [1 or H, M, 3] of the tokens the last append wrote."""
        H, M = self.new_slots.shape
        self.position.scatter_(1, self.new_slots.unsqueeze(-1).expand(-1, -1, 3), position.expand(H, M, 3))

    def evict(self, evicted: Tensor, free: Tensor, num_tokens: int) -> None:
        """Mark ``evicted`` [H, E] free; ``free`` [H, S - num_tokens] becomes the free-slot list."""
        self.frame.scatter_(1, evicted, FREE)
        self.free = free
        self._num_tokens = num_tokens
        if evicted.shape[1]:
            self.prefix = False
        self.new_slots = None

    def compact(self) -> LayerTokens:
        """The live tokens as a default store, in (frame, in-frame index) order per head (copies)."""
        order = time_order(self.frame, self.index)[:, : self._num_tokens]

        def take(t: Optional[Tensor]) -> Optional[Tensor]:
            if t is None:
                return None
            idx = order if t.dim() == 2 else order.unsqueeze(-1).expand(-1, -1, t.shape[-1])
            return torch.gather(t, 1, idx)

        return LayerTokens(take(self.k), take(self.v), take(self.frame), take(self.index), take(self.score), take(self.position))
