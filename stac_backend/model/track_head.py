"""The point-tracking head's parameters.

Every released VGGT-family checkpoint carries a tracking head (a DPT feature extractor plus an
iterative transformer tracker). Reconstruction serving does not track points, so this module only
declares the same parameters - names and shapes exactly as released - so checkpoints load strictly
and round-trip unchanged. Calling it raises a clear error instead of returning something wrong.
"""

from __future__ import annotations

import torch
from torch import nn

from .dpt_head import DPTHead
from .layers import Mlp


class _AttnBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))


class _CrossAttnBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.norm_context = nn.LayerNorm(hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.cross_attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))


class _UpdateFormer(nn.Module):
    def __init__(self, depth: int, input_dim: int, hidden: int, output_dim: int, num_virtual: int, heads: int = 8):
        super().__init__()
        self.input_norm = nn.LayerNorm(input_dim)
        self.input_transform = nn.Linear(input_dim, hidden)
        self.output_norm = nn.LayerNorm(hidden)
        self.flow_head = nn.Linear(hidden, output_dim)
        # (sic) the released name
        self.virual_tracks = nn.Parameter(torch.randn(1, num_virtual, 1, hidden))
        self.time_blocks = nn.ModuleList([_AttnBlock(hidden, heads, 4.0) for _ in range(depth)])
        self.space_virtual_blocks = nn.ModuleList([_AttnBlock(hidden, heads, 4.0) for _ in range(depth)])
        self.space_point2virtual_blocks = nn.ModuleList([_CrossAttnBlock(hidden, heads, 4.0) for _ in range(depth)])
        self.space_virtual2point_blocks = nn.ModuleList([_CrossAttnBlock(hidden, heads, 4.0) for _ in range(depth)])


class _Tracker(nn.Module):
    def __init__(self, latent: int, corr_levels: int, corr_radius: int, hidden: int, depth: int, num_virtual: int):
        super().__init__()
        corr_dim = corr_levels * (2 * corr_radius + 1) ** 2
        transformer_dim = 3 * latent + 4
        self.corr_mlp = Mlp(corr_dim, hidden, latent)
        self.query_ref_token = nn.Parameter(torch.randn(1, 2, transformer_dim))
        self.updateformer = _UpdateFormer(depth, transformer_dim, hidden, latent + 2, num_virtual)
        self.fmap_norm = nn.LayerNorm(latent)
        self.ffeat_norm = nn.GroupNorm(1, latent)
        self.ffeat_updater = nn.Sequential(nn.Linear(latent, latent), nn.GELU())
        self.vis_predictor = nn.Sequential(nn.Linear(latent, 1))
        self.conf_predictor = nn.Sequential(nn.Linear(latent, 1))


class TrackHead(nn.Module):
    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        features: int = 128,
        out_channels=(256, 512, 1024, 1024),
        intermediate_layer_idx=(4, 11, 17, 23),
        corr_levels: int = 7,
        corr_radius: int = 4,
        hidden_size: int = 384,
        depth: int = 6,
        num_virtual_tracks: int = 64,
    ):
        super().__init__()
        self.feature_extractor = DPTHead(
            dim_in, patch_size, features=features, out_channels=out_channels,
            intermediate_layer_idx=intermediate_layer_idx, feature_only=True, down_ratio=2, pos_embed=False,
        )
        self.tracker = _Tracker(features, corr_levels, corr_radius, hidden_size, depth, num_virtual_tracks)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(
            "point tracking is not part of reconstruction serving; the track head is loaded only so "
            "released checkpoints load strictly"
        )
