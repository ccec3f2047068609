"""The unbounded cache: every key/value of every earlier frame is kept (StreamVGGT / STream3R).

The reference every bounded policy is measured against. Its content grows by exactly
``2 * depth * tokens_per_frame * embed_dim * element_size`` bytes per frame.

``growth`` (``CacheConfig.full_growth``) chooses how a layer's keys are stored:

* 1.0 (default): one exactly sized tensor per layer, re-made by ``torch.cat`` every step, as the
  reference implementations do. Memory is exact, but every step copies the whole cache.
* > 1 (e.g. 1.25): a buffer with spare capacity; a step writes its keys in place and the cache is
  copied only when the buffer is full (amortised, as a growing array). Up to ``growth - 1`` of the
  cache is spare capacity, and ``memory_bytes`` counts it (it is held). Used while autograd records
  (training), the exact path is taken, since in-place writes would invalidate saved views.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import CacheGeometry, CachePolicy, KeySet, check_state_names


class FullCache(CachePolicy):
    name = "full"

    def __init__(self, growth: float = 1.0) -> None:
        if not (isinstance(growth, (int, float)) and math.isfinite(growth) and growth >= 1.0):
            raise ValueError(f"full cache growth must be a number >= 1, got {growth!r}")
        self.growth = float(growth)
        self.keys: dict[int, Tensor] = {}  # [H, capacity, D] per layer
        self.values: dict[int, Tensor] = {}
        self.used: dict[int, int] = {}  # tokens stored per layer (<= capacity)

    def prepare(self, layer: int, k: Tensor, v: Tensor) -> KeySet:
        if self.growth == 1.0 or k.requires_grad:
            return self._prepare_exact(layer, k, v)
        used = self.used.get(layer, 0)
        needed = used + k.shape[1]
        if layer not in self.keys or needed > self.keys[layer].shape[1]:
            self._reallocate(layer, used, math.ceil(needed * self.growth), k, v)
        self.keys[layer][:, used:needed] = k
        self.values[layer][:, used:needed] = v
        self.used[layer] = needed
        return KeySet(self.keys[layer][:, :needed], self.values[layer][:, :needed])

    def _prepare_exact(self, layer: int, k: Tensor, v: Tensor) -> KeySet:
        if layer in self.keys:
            used = self.used[layer]
            k = torch.cat([self.keys[layer][:, :used], k], dim=1)
            v = torch.cat([self.values[layer][:, :used], v], dim=1)
        self.keys[layer], self.values[layer] = k, v
        self.used[layer] = k.shape[1]
        return KeySet(k, v)

    def _reallocate(self, layer: int, used: int, capacity: int, k: Tensor, v: Tensor) -> None:
        for store, new_tokens in ((self.keys, k), (self.values, v)):
            buffer = new_tokens.new_empty((new_tokens.shape[0], capacity, new_tokens.shape[2]))
            if used:
                buffer[:, :used] = store[layer][:, :used]
            store[layer] = buffer  # the old buffer is freed here, before the next one is made

    @staticmethod
    def bytes_per_frame(geometry: CacheGeometry, tokens_per_frame: int) -> int:
        """Bytes one more frame adds: a key and a value per token, layer and head."""
        g = geometry
        return 2 * g.num_layers * g.num_heads * g.head_dim * tokens_per_frame * g.element_size

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))

    def used_bytes(self) -> int:
        """Bytes of the stored keys/values alone (without spare capacity)."""
        return sum(
            self.used[layer] * t.shape[0] * t.shape[2] * t.element_size()
            for store in (self.keys, self.values)
            for layer, t in store.items()
        )

    def num_tokens(self, layer: int = 0) -> int:
        return self.used.get(layer, 0)

    def reset(self) -> None:
        self.keys.clear()
        self.values.clear()
        self.used.clear()

    def stats(self) -> dict:
        return {"memory_bytes": self.memory_bytes(), "used_bytes": self.used_bytes(), "tokens": self.num_tokens()}

    def export_state(self) -> dict[str, Tensor]:
        """``kv_k``/``kv_v`` [L, H, N, D]: the stored keys/values of layers 0 .. L-1 (no spare capacity)."""
        layers = sorted(self.keys)
        if layers != list(range(len(layers))) or len({self.used[i] for i in layers}) > 1:
            raise RuntimeError("export_state() is only valid between steps (every layer 0 .. L-1 holds the same tokens)")
        if not layers:
            empty = torch.zeros(0, 0, 0, 0)
            return {"kv_k": empty, "kv_v": empty.clone()}
        return {
            "kv_k": torch.stack([self.keys[i][:, : self.used[i]] for i in layers]),  # stack copies
            "kv_v": torch.stack([self.values[i][:, : self.used[i]] for i in layers]),
        }

    def import_state(self, state: dict[str, Tensor]) -> None:
        """Exactly sized buffers (spare capacity, with growth > 1, comes back as steps append)."""
        check_state_names("full cache", state, ("kv_k", "kv_v"))
        k, v = state["kv_k"], state["kv_v"]
        if k.dim() != 4 or v.shape != k.shape:
            raise ValueError(f"kv_k and kv_v must be [L, H, N, D] alike, got {tuple(k.shape)} and {tuple(v.shape)}")
        self.reset()
        for layer in range(k.shape[0]):
            self.keys[layer], self.values[layer] = k[layer].clone(), v[layer].clone()
            self.used[layer] = k.shape[2]
