"""Patch embeddings: a plain strided conv, or a DINOv2 ViT with register tokens.

Both map images [N, 3, H, W] (already ImageNet-normalised) to patch tokens [N, (H/p)*(W/p), D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DINO_VARIANTS
from .layers import Block


class ConvPatchEmbed(nn.Module):
    """Non-overlapping p x p patches projected by one conv (parameter names as the original)."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class DinoViT(nn.Module):
    """DINOv2 ViT-{S,B,L,G}/14 with registers, returning the final-normed patch tokens.

    The learned position embedding is defined for a square ``img_size`` grid and is resized
    bicubically (with antialiasing, no offset, as VGGT configures it) to other grids.
    """

    def __init__(self, variant: str, img_size: int, patch_size: int, num_register_tokens: int):
        super().__init__()
        if variant not in DINO_VARIANTS:
            raise ValueError(f"unknown DINOv2 variant {variant!r}")
        spec = DINO_VARIANTS[variant]
        dim, depth, heads = spec["embed_dim"], spec["depth"], spec["num_heads"]
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.grid = img_size // patch_size

        self.patch_embed = ConvPatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, dim)) if num_register_tokens else None
        # Unused at inference, but part of every released checkpoint.
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.blocks = nn.ModuleList(
            [Block(dim, heads, mlp_ratio=4.0, init_values=1.0, norm_eps=1e-6) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)

    def position_embedding(self, grid_h: int, grid_w: int, dtype: torch.dtype) -> Tensor:
        if grid_h == self.grid and grid_w == self.grid:
            return self.pos_embed.to(dtype)
        table = self.pos_embed.float()
        cls_pos, patch_pos = table[:, :1], table[:, 1:]
        dim = table.shape[-1]
        square = patch_pos.reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        resized = F.interpolate(square, size=(grid_h, grid_w), mode="bicubic", antialias=True)
        resized = resized.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat([cls_pos, resized], dim=1).to(dtype)

    def forward(self, images: Tensor) -> Tensor:
        n, _, h, w = images.shape
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(n, -1, -1).to(x.dtype), x], dim=1)
        x = x + self.position_embedding(h // self.patch_size, w // self.patch_size, x.dtype)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(n, -1, -1).to(x.dtype), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, 1 + self.num_register_tokens :]


def build_patch_embed(kind: str, img_size: int, patch_size: int, num_register_tokens: int, embed_dim: int) -> nn.Module:
    if kind == "conv":
        return ConvPatchEmbed(patch_size, embed_dim)
    return DinoViT(kind, img_size, patch_size, num_register_tokens)



__all__ = ["ConvPatchEmbed", "DinoViT", "build_patch_embed"]
