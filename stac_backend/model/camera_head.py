"""Camera head: a small transformer trunk over the frames' camera tokens that refines a 9-number
pose encoding (translation 3, quaternion XYZW 4, field of view h/w 2) over a few iterations, with
AdaLN modulation from the embedded previous estimate.

Across frames the trunk's attention is delegated like the aggregator's: ``CameraAttention.attend(
iteration, block, q, k, v)``. Offline it is dense (or block-causal under a mask); streaming keeps one
small key/value cache per (iteration, block), so iteration i of a frame sees iteration i of earlier
frames - exactly the batched block-causal semantics the model is trained with.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Block, Mlp
from .transfer import to_device_nonblocking

POSE_ENCODING_DIM = 9


class CameraAttention(Protocol):
    def attend(self, iteration: int, block: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...


class DenseCameraAttention:
    def __init__(self, mask: Optional[Tensor] = None):
        self.mask = mask

    def attend(self, iteration: int, block: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


class CameraKVCache:
    """Causal memory of the camera trunk: keys/values of earlier frames per (iteration, block).

    One token per frame per entry - small, but it grows with the stream, so it is counted in a
    stream's memory and can be bounded: with ``max_frames`` set, only the pinned frames and the
    most recent ``max_frames`` frames are kept (a sliding window with attention sinks).
    """

    def __init__(self, max_frames: Optional[int] = None, pinned_frames: tuple[int, ...] = (0,)) -> None:
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be positive or None, got {max_frames}")
        self.max_frames = max_frames
        self.pinned_frames = tuple(pinned_frames)
        self.keys: dict[tuple[int, int], Tensor] = {}
        self.values: dict[tuple[int, int], Tensor] = {}
        self.frames = torch.zeros(0, dtype=torch.long)  # stream index of each cached token
        self._pending = 0

    def prepare(self, iteration: int, block: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the step's keys/values [H, M, D]; return all keys/values to attend to [H, N, D]."""
        key = (iteration, block)
        self._pending = k.shape[1]
        if key in self.keys:
            k = torch.cat([self.keys[key], k], dim=1)
            v = torch.cat([self.values[key], v], dim=1)
        self.keys[key], self.values[key] = k, v
        return k, v

    def attend(self, iteration: int, block: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        keys, values = self.prepare(iteration, block, k[0], v[0])
        return F.scaled_dot_product_attention(q, keys[None], values[None])

    def end_step(self, frame_offset: int) -> None:
        """Record the step's frames and drop those that fell out of the window."""
        new = torch.arange(frame_offset, frame_offset + self._pending)
        self.frames = torch.cat([self.frames, new])
        self._pending = 0
        if self.max_frames is None or not self.keys:
            return
        latest = int(self.frames.max())
        keep = self.frames > latest - self.max_frames
        for f in self.pinned_frames:
            keep |= self.frames == f
        if bool(keep.all()):
            return
        idx = keep.nonzero().squeeze(1)
        self.frames = self.frames[idx]
        # one host-to-device copy for all keys, not blocking (a blocking one would wait for the GPU)
        device_idx = to_device_nonblocking(idx, next(iter(self.keys.values())).device)
        for key in self.keys:
            self.keys[key] = self.keys[key].index_select(1, device_idx)
            self.values[key] = self.values[key].index_select(1, device_idx)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))

    def clear(self) -> None:
        self.keys.clear()
        self.values.clear()
        self.frames = torch.zeros(0, dtype=torch.long)
        self._pending = 0


class BatchedCameraAttention:
    """Camera-trunk attention for several streams in one call, each over its own cache."""

    def __init__(self, caches: list["CameraKVCache"]):
        self.caches = caches

    def attend(self, iteration: int, block: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if len(self.caches) == 1:
            return self.caches[0].attend(iteration, block, q, k, v)
        sets = [c.prepare(iteration, block, k[b], v[b]) for b, c in enumerate(self.caches)]
        longest = max(ks.shape[1] for ks, _ in sets)
        keys = q.new_zeros(len(sets), q.shape[1], longest, q.shape[3])
        values = torch.zeros_like(keys)
        valid = torch.zeros(len(sets), 1, 1, longest, dtype=torch.bool, device=q.device)
        for b, (ks, vs) in enumerate(sets):
            keys[b, :, : ks.shape[1]], values[b, :, : ks.shape[1]] = ks, vs
            valid[b, ..., : ks.shape[1]] = True
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=valid)


def activate_pose(raw: Tensor) -> Tensor:
    """Translation and quaternion stay linear; the field of view goes through ReLU."""
    return torch.cat([raw[..., :7], F.relu(raw[..., 7:])], dim=-1)


class CameraHead(nn.Module):
    def __init__(
        self,
        dim_in: int = 2048,
        trunk_depth: int = 4,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        init_values: float = 0.01,
        iterations: int = 4,
    ):
        super().__init__()
        self.iterations = iterations
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk = nn.ModuleList(
            [Block(dim_in, num_heads, mlp_ratio, init_values=init_values) for _ in range(trunk_depth)]
        )
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, POSE_ENCODING_DIM))
        self.embed_pose = nn.Linear(POSE_ENCODING_DIM, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim_in, dim_in // 2, POSE_ENCODING_DIM)

    def forward(self, camera_tokens: Tensor, attention: Optional[CameraAttention] = None) -> list[Tensor]:
        """camera_tokens [B, S, dim_in] (the camera token of the last aggregator layer).

        Returns the activated pose encoding [B, S, 9] after each refinement iteration.
        """
        attention = attention or DenseCameraAttention()
        tokens = self.token_norm(camera_tokens)
        B, S, _ = tokens.shape
        raw: Optional[Tensor] = None
        results = []
        for it in range(self.iterations):
            source = self.empty_pose_tokens.expand(B, S, -1) if raw is None else raw.detach()
            shift, scale, gate = self.poseLN_modulation(self.embed_pose(source)).chunk(3, dim=-1)
            x = gate * (self.adaln_norm(tokens) * (1 + scale) + shift) + tokens
            for b, block in enumerate(self.trunk):
                x = block(x, attend=_bind(attention, it, b))
            delta = self.pose_branch(self.trunk_norm(x))
            raw = delta if raw is None else raw + delta
            results.append(activate_pose(raw))
        return results


def _bind(attention: CameraAttention, iteration: int, block: int):
    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attention.attend(iteration, block, q, k, v)

    return attend
