"""Transformer building blocks shared by the patch embed, the aggregator and the camera head.

Module and parameter names follow the original code (``norm1``, ``attn.qkv``, ``ls1.gamma``, ...)
so released state dicts load without renaming.

Attention is split in two so that caches can be plugged in without the model knowing about them:
``SelfAttention.project_qkv`` computes q, k, v (with q/k LayerNorm and 2D RoPE applied, i.e. exactly
what a key/value cache stores), the block hands them to an ``attend(q, k, v)`` callable (by default
plain scaled-dot-product attention over the given tokens) and ``SelfAttention.project_out`` projects
the result.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.qk_norm_rope import fused_applies, qk_norm_rope
from .rope import RotaryEmbedding2D

# attend(q, k, v) -> out; all [B, heads, tokens, head_dim]
AttendFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def dense_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Plain softmax attention of every query over every key."""
    return F.scaled_dot_product_attention(q, k, v)


def masked_attention(mask: Tensor) -> AttendFn:
    """Attention restricted by a boolean mask [Nq, Nk] (True = may attend)."""

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return attend


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class SelfAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        qk_norm: bool = False,
        rope: Optional[RotaryEmbedding2D] = None,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.rope = rope

    def project_qkv(self, x: Tensor, pos: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v as [B, heads, N, head_dim], after q/k norm and RoPE (what a KV cache stores)."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        if self.rope is not None and pos is not None and fused_applies(qkv, self.q_norm, self.head_dim):
            # one kernel for both norms and both rotations (kernels/qk_norm_rope.py), same numbers
            cos, sin = self.rope.tables(pos, self.head_dim // 2, qkv.device, qkv.dtype)
            q, k = qk_norm_rope(qkv, pos, cos, sin, self.q_norm, self.k_norm)
            return q, k, qkv[:, :, 2].transpose(1, 2)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            if pos is None:
                raise ValueError("this attention layer uses RoPE and needs token positions")
            q, k = self.rope(q, pos), self.rope(k, pos)
        return q, k, v

    def project_out(self, attended: Tensor) -> Tensor:
        """The attention's output [B, heads, N, head_dim] -> proj -> [B, N, dim]."""
        B, _, N, _ = attended.shape
        return self.proj(attended.transpose(1, 2).reshape(B, N, -1))


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        qk_norm: bool = False,
        init_values: Optional[float] = None,
        rope: Optional[RotaryEmbedding2D] = None,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SelfAttention(dim, num_heads, qkv_bias, proj_bias, qk_norm, rope)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: Tensor, pos: Optional[Tensor] = None, attend: Optional[AttendFn] = None) -> Tensor:
        q, k, v = self.attention_inputs(x, pos)
        return self.attention_outputs(x, (attend or dense_attention)(q, k, v))

    # The block in two halves around its attention, so that a caller can run each half on its own
    # (CUDA graphs of the blocks whose attention reads a cache, cuda_graphs.py).
    def attention_inputs(self, x: Tensor, pos: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """norm1 -> q, k, v [B, heads, N, head_dim] after q/k norm and RoPE."""
        return self.attn.project_qkv(self.norm1(x), pos)

    def attention_outputs(self, x: Tensor, attended: Tensor) -> Tensor:
        """The attention's output [B, heads, N, head_dim] -> proj -> LayerScale -> residual, then the MLP half."""
        x = x + self.ls1(self.attn.project_out(attended))
        return x + self.ls2(self.mlp(self.norm2(x)))
