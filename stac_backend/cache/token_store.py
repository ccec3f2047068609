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

    def absorb_scores(self, score: Tensor, old: int, n_extra: int, gamma: float) -> None:
        """Scores [H, old + n_extra + new] of the step's key set (stored, extra, new): the stored
        tokens' decay and add, the new ones' are set; the extra keys' are not read."""
        self.score[:, :old].mul_(gamma).add_(score[:, :old])
        self.score[:, old:] = score[:, old + n_extra :]

    def write_new_positions(self, position: Tensor) -> None:
        """Positions [1 or H, M, 3] of the last M tokens (the step's new ones: they were appended)."""
        self.position[:, -position.shape[1] :] = position

    def take(self, heads: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        """k, v, score and position of (head, token) pairs (copies)."""
        return (self.k[heads, tokens], self.v[heads, tokens], None if self.score is None else self.score[heads, tokens],
                None if self.position is None else self.position[heads, tokens])

    def head_tokens(self, head: int) -> tuple[Tensor, Tensor]:
        """Frame [N] and position [N, 3] of every token one head holds."""
        return self.frame[head], self.position[head]

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


def export_layers(layers: dict[int, LayerTokens], num_heads: int, head_dim: int, dtype: torch.dtype, device,
                  with_score: bool, with_position: bool) -> dict[str, Tensor]:
    """Every layer's store stacked into plain tensors (copies), as the exported step names them:
    ``hot_k``/``hot_v`` [L, H, N, D], ``hot_frame``/``hot_index`` [L, H, N] int32 and, if kept,
    ``hot_score`` [L, H, N] and ``hot_pos`` [L, H, N, 3]. Layers are 0 .. L-1 and hold the same
    number of tokens (true between steps)."""
    ids = sorted(layers)
    if ids != list(range(len(ids))):
        raise RuntimeError(f"cannot export layers {ids}: expected 0 .. {len(ids) - 1}")
    stores = [layers[i] for i in ids]
    if len({s.num_tokens for s in stores}) > 1:
        raise RuntimeError("layers hold different numbers of tokens: export between steps")

    def stacked(field: str, tail: tuple[int, ...], field_dtype: torch.dtype) -> Tensor:
        if not stores:
            return torch.zeros((0, num_heads, 0) + tail, dtype=field_dtype, device=device)
        return torch.stack([getattr(s, field) for s in stores])  # a new tensor: a copy

    state = {
        "hot_k": stacked("k", (head_dim,), dtype),
        "hot_v": stacked("v", (head_dim,), dtype),
        "hot_frame": stacked("frame", (), torch.int32),
        "hot_index": stacked("index", (), torch.int32),
    }
    if with_score:
        state["hot_score"] = stacked("score", (), torch.float32)
    if with_position:
        state["hot_pos"] = stacked("position", (3,), torch.float32)
    return state


def import_layers(state: dict[str, Tensor], num_heads: int, head_dim: int, device, with_score: bool,
                  with_position: bool) -> dict[int, LayerTokens]:
    """The stores ``export_layers`` exported (each tensor copied to ``device``)."""
    k = state["hot_k"]
    if k.dim() != 4 or k.shape[1] != num_heads or k.shape[3] != head_dim:
        raise ValueError(f"hot_k must be [layers, {num_heads}, tokens, {head_dim}], got {tuple(k.shape)}")
    L, _, N, _ = k.shape
    expected = {"hot_v": (L, num_heads, N, head_dim), "hot_frame": (L, num_heads, N), "hot_index": (L, num_heads, N)}
    if with_score:
        expected["hot_score"] = (L, num_heads, N)
    if with_position:
        expected["hot_pos"] = (L, num_heads, N, 3)
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{name} must be {shape} to match hot_k, got {tuple(state[name].shape)}")

    def take(name: str, layer: int) -> Optional[Tensor]:
        return state[name][layer].to(device).clone() if name in expected or name == "hot_k" else None

    return {
        layer: LayerTokens(take("hot_k", layer), take("hot_v", layer), take("hot_frame", layer), take("hot_index", layer),
                           take("hot_score", layer), take("hot_pos", layer))
        for layer in range(L)
    }
