"""The unbounded cache: every key/value of every earlier frame is kept (StreamVGGT / STream3R).

The reference every bounded policy is measured against. Memory grows by exactly
``2 * depth * tokens_per_frame * embed_dim * element_size`` bytes per frame.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import CachePolicy


class FullCache(CachePolicy):
    name = "full"

    def __init__(self) -> None:
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if layer in self.keys:
            # One copy per step into an exactly-sized tensor: memory_bytes stays exact.
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return F.scaled_dot_product_attention(q, k, v)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))

    def num_tokens(self, layer: int = 0) -> int:
        return 0 if layer not in self.keys else self.keys[layer].shape[2]

    def reset(self) -> None:
        self.keys.clear()
        self.values.clear()

    def stats(self) -> dict:
        return {"memory_bytes": self.memory_bytes(), "tokens": self.num_tokens()}
