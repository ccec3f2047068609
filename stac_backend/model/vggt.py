"""The VGGT-family network: aggregator + camera, depth, point (and track) heads.

Two ways to run it:
- ``forward(images)``: offline, all frames at once. ``chunk_size=None`` is VGGT (every frame sees
  every frame); ``chunk_size=c`` applies the block-causal mask a stream with chunks of c frames
  realises (frames see all earlier chunks and their own chunk, both ways).
- ``forward_step(images, frame_offset, global_attention, camera_attention)``: one streaming step on
  a chunk of frames; the attention objects carry the stream's caches. The engine owns them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .aggregator import Aggregator, DenseGlobalAttention, FrameOffset, GlobalAttention
from .camera_head import CameraAttention, CameraHead, DenseCameraAttention
from .config import ModelConfig
from .dpt_head import DPTHead
from .pose import pose_encoding_to_extri_intri
from .track_head import TrackHead

# Names of the per-frame outputs (all [B, S, ...]).
OUTPUT_NAMES = (
    "depth",  # [B, S, H, W]   z-depth in scene units
    "depth_conf",  # [B, S, H, W]
    "world_points",  # [B, S, H, W, 3] in the first frame's camera coordinates
    "world_points_conf",  # [B, S, H, W]
    "pose_enc",  # [B, S, 9]
    "extrinsics",  # [B, S, 3, 4] OpenCV camera-from-world
    "intrinsics",  # [B, S, 3, 3]
)


def chunk_causal_mask(num_frames: int, chunk_size: int, device=None) -> Tensor:
    """[S, S] bool: frame i may attend to frame j when j's chunk is not after i's - what a stream
    with chunks of ``chunk_size`` frames realises."""
    chunk = torch.arange(num_frames, device=device) // chunk_size
    return chunk[:, None] >= chunk[None, :]


class VGGT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.config = c
        # Frames per pass through the DPT heads: bounds activation memory at inference; training
        # sets it to None (all frames at once) to avoid thousands of small kernel launches.
        self.dpt_frames_chunk: Optional[int] = 8
        self.aggregator = Aggregator(c)
        dim = 2 * c.embed_dim
        self.camera_head = (
            CameraHead(dim, c.camera_trunk_depth, c.camera_num_heads, c.camera_mlp_ratio, c.camera_init_values, c.camera_iterations)
            if c.enable_camera
            else None
        )
        dpt = dict(
            patch_size=c.patch_size, features=c.dpt_features, out_channels=c.dpt_out_channels,
            intermediate_layer_idx=c.dpt_intermediate_layer_idx,
        )
        self.point_head = DPTHead(dim, output_dim=4, activation="inv_log", conf_activation="expp1", **dpt) if c.enable_point else None
        self.depth_head = DPTHead(dim, output_dim=2, activation="exp", conf_activation="expp1", **dpt) if c.enable_depth else None
        self.track_head = (
            TrackHead(
                dim, c.patch_size, c.track_features, c.dpt_out_channels, c.dpt_intermediate_layer_idx,
                c.track_corr_levels, c.track_corr_radius, c.track_hidden_size, c.track_depth, c.track_num_virtual_tracks,
            )
            if c.enable_track
            else None
        )

    # ------------------------------------------------------------------ offline
    def forward(self, images: Tensor, chunk_size: Optional[int] = None, frame_mask: Optional[Tensor] = None
                ) -> dict[str, Tensor]:
        """All frames at once: images [B, S, 3, H, W] (or [S, 3, H, W]) float in [0, 1].

        ``frame_mask`` ([S, S] or [B, S, S], bool: which frames each frame's tokens may attend to)
        replaces the global blocks' mask, e.g. to train under what a bounded cache holds; the
        camera trunk keeps the mask of ``chunk_size``.
        """
        if images.dim() == 4:
            images = images.unsqueeze(0)
        B, S, _, H, W = images.shape
        global_attention: GlobalAttention = DenseGlobalAttention()
        camera_attention: CameraAttention = DenseCameraAttention()
        if frame_mask is not None and (frame_mask.shape[-2:] != (S, S) or frame_mask.dtype != torch.bool):
            raise ValueError(f"frame_mask must be bool [S, S] or [B, S, S] with S={S}, got "
                             f"{frame_mask.dtype} {tuple(frame_mask.shape)}")
        if chunk_size is not None:
            camera_mask = chunk_causal_mask(S, chunk_size, images.device)
            camera_attention = DenseCameraAttention(camera_mask)
            if frame_mask is None:
                frame_mask = camera_mask
        if frame_mask is not None:
            # expanded to tokens once: [S*P, S*P] is large for long training windows
            P = self.config.tokens_per_frame(H, W)
            tokens = frame_mask.repeat_interleave(P, dim=-2).repeat_interleave(P, dim=-1)
            global_attention = DenseGlobalAttention(tokens if tokens.dim() == 2 else tokens[:, None])
        return self.forward_step(images, 0, global_attention, camera_attention)

    # ------------------------------------------------------------------ streaming
    def forward_step(
        self,
        images: Tensor,
        frame_offset: FrameOffset,
        global_attention: GlobalAttention,
        camera_attention: Optional[CameraAttention] = None,
    ) -> dict[str, Tensor]:
        """One step over images [B, C, 3, H, W]; frame_offset = stream index of images[:, 0] (per row or shared)."""
        c = self.config
        H, W = images.shape[-2:]
        layers = self.aggregator(images, frame_offset, global_attention, keep_layers=c.kept_layers)
        out: dict[str, Tensor] = {}
        psi = c.patch_start_idx
        if self.camera_head is not None:
            pose_enc = self.camera_head(layers[-1][:, :, 0], camera_attention)[-1]
            out["pose_enc"] = pose_enc
            out["extrinsics"], out["intrinsics"] = pose_encoding_to_extri_intri(pose_enc, (H, W))
        if self.depth_head is not None:
            depth, depth_conf = self.depth_head(layers, (H, W), psi, self.dpt_frames_chunk)
            out["depth"], out["depth_conf"] = depth[..., 0], depth_conf
        if self.point_head is not None:
            out["world_points"], out["world_points_conf"] = self.point_head(layers, (H, W), psi, self.dpt_frames_chunk)
        return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
