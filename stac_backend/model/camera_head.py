"""Camera head: a small transformer trunk over the frames' camera tokens that refines a 9-number
pose encoding (translation 3, quaternion XYZW 4, field of view h/w 2) over a few iterations, with
AdaLN modulation from the embedded previous estimate.

Across frames the trunk's attention is delegated like the aggregator's: ``CameraAttention.attend(
iteration, block, q, k, v)``. Offline it is dense (or block-causal under a mask); a stream attends
through its camera cache (``cache/camera.py``: one small key/value history per (iteration, block)),
so iteration i of a frame sees iteration i of earlier frames - exactly the batched block-causal
semantics the model is trained with.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Block, Mlp

POSE_ENCODING_DIM = 9


class CameraAttention(Protocol):
    """Attention of the trunk's queries q [B, heads, S, D] (one camera token per frame) over keys and
    values of the same frames and, when streaming, of earlier ones."""

    def attend(self, iteration: int, block: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...


class DenseCameraAttention:
    def __init__(self, mask: Optional[Tensor] = None):
        self.mask = mask

    def attend(self, iteration: int, block: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


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
