"""The unbounded cache: every key/value of every earlier frame is kept (StreamVGGT / STream3R).

The reference every bounded policy is measured against. Memory grows by exactly
``2 * depth * tokens_per_frame * embed_dim * element_size`` bytes per frame.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import CachePolicy, KeySet


class FullCache(CachePolicy):
    name = "full"

    def __init__(self) -> None:
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}

    def prepare(self, layer: int, k: Tensor, v: Tensor) -> KeySet:
        if layer in self.keys:
            # One copy per step into an exactly-sized tensor: memory_bytes stays exact.
            k = torch.cat([self.keys[layer], k], dim=1)
            v = torch.cat([self.values[layer], v], dim=1)
        self.keys[layer], self.values[layer] = k, v
        return KeySet(k, v)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))

    def num_tokens(self, layer: int = 0) -> int:
        return 0 if layer not in self.keys else self.keys[layer].shape[1]

    def reset(self) -> None:
        self.keys.clear()
        self.values.clear()

    def stats(self) -> dict:
        return {"memory_bytes": self.memory_bytes(), "tokens": self.num_tokens()}
