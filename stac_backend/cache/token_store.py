"""Per-layer storage of a stream's hot (attended) tokens, with per-head bookkeeping.

Each global-attention layer keeps keys and values [heads, N, head_dim] and, per token and head,
the frame it came from, its index within that frame, its decayed attention score and (for spatial
policies) its 3D position. Heads may hold different tokens (pruning is per head) but always the
same number, so attention over the store stays one dense batched call.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class LayerTokens:
    def __init__(self, k: Tensor, v: Tensor, frame: Tensor, index: Tensor, score: Optional[Tensor], position: Optional[Tensor]):
        self.k, self.v = k, v  # [H, N, D]
        self.frame = frame  # [H, N] int32: stream frame index
        self.index = index  # [H, N] int32: token index within its frame
        self.score = score  # [H, N] float32 decayed attention mass, or None
        self.position = position  # [H, N, 3] float32 world position (NaN = none), or None

    @property
    def num_tokens(self) -> int:
        return self.k.shape[1]

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.k, self.v, self.frame, self.index, self.score, self.position) if t is not None]

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def append(self, k: Tensor, v: Tensor, frame: Tensor, index: Tensor, score: Optional[Tensor], position: Optional[Tensor]) -> None:
        self.k = torch.cat([self.k, k], dim=1)
        self.v = torch.cat([self.v, v], dim=1)
        self.frame = torch.cat([self.frame, frame], dim=1)
        self.index = torch.cat([self.index, index], dim=1)
        if self.score is not None:
            self.score = torch.cat([self.score, score], dim=1)
        if self.position is not None:
            self.position = torch.cat([self.position, position], dim=1)

    def select(self, keep: Tensor) -> "LayerTokens":
        """Tokens at per-head indices keep [H, K] (a new store; self is unchanged)."""
        def take(t: Optional[Tensor]) -> Optional[Tensor]:
            if t is None:
                return None
            idx = keep if t.dim() == 2 else keep.unsqueeze(-1).expand(-1, -1, t.shape[-1])
            return torch.gather(t, 1, idx)

        return LayerTokens(take(self.k), take(self.v), take(self.frame), take(self.index), take(self.score), take(self.position))


def step_token_ids(num_heads: int, frame_offset: int, num_frames: int, tokens_per_frame: int, device) -> tuple[Tensor, Tensor]:
    """Frame index and in-frame index [H, C*P] (int32) of a step's new tokens."""
    frames = torch.arange(frame_offset, frame_offset + num_frames, device=device, dtype=torch.int32)
    frame = frames.repeat_interleave(tokens_per_frame)
    index = torch.arange(tokens_per_frame, device=device, dtype=torch.int32).repeat(num_frames)
    return frame.expand(num_heads, -1).contiguous(), index.expand(num_heads, -1).contiguous()


def bytes_per_token(head_dim: int, element_size: int, with_score: bool, with_position: bool) -> int:
    """Bytes one token costs in one head of one layer's store."""
    return 2 * head_dim * element_size + 4 + 4 + (4 if with_score else 0) + (12 if with_position else 0)
