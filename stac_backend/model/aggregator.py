"""The alternating-attention aggregator: frame blocks (within one frame) and global blocks (across
frames), 2D RoPE, camera and register tokens.

Global attention is delegated: the caller passes a ``GlobalAttention`` whose ``attend(layer, q, k,
v)`` sees the step's queries/keys/values (after q/k norm and RoPE) and returns the attention output.
Offline inference uses dense attention over the frames given; streaming passes a key/value cache.
The aggregator knows nothing about how (or whether) that cache is bounded.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence, Union

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .layers import AttendFn, Block, dense_attention
from .patch_embed import build_patch_embed
from .rope import RotaryEmbedding2D, frame_token_positions
from .transfer import compiling_or_exporting, to_device_nonblocking

FrameOffset = Union[int, Sequence[int]]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GlobalAttention(Protocol):
    """What the aggregator asks of a cache: attention of this step's tokens over past + present."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q, k, v: [B, heads, N_step, head_dim] for the step's tokens; returns [B, heads, N_step, head_dim]."""
        ...


class DenseGlobalAttention:
    """Every token attends to every token of the step (offline VGGT), optionally under a mask."""

    def __init__(self, mask: Optional[Tensor] = None):
        self.mask = mask

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.mask is None:
            return dense_attention(q, k, v)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


class Aggregator(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.config = c
        self.patch_embed = build_patch_embed(c.patch_embed, c.img_size, c.patch_size, c.num_register_tokens, c.embed_dim)
        self.rope = RotaryEmbedding2D(c.rope_freq) if c.rope_freq > 0 else None
        self._positions: tuple = ()  # (key, frame positions, global positions) of the last step's shape

        def make_block() -> Block:
            return Block(
                c.embed_dim, c.num_heads, c.mlp_ratio, c.qkv_bias, c.proj_bias, c.ffn_bias,
                qk_norm=c.qk_norm, init_values=c.init_values, rope=self.rope,
            )

        self.frame_blocks = nn.ModuleList([make_block() for _ in range(c.depth)])
        self.global_blocks = nn.ModuleList([make_block() for _ in range(c.depth)])
        # Index 0 of each special token is used for the first frame of a stream, index 1 for all others.
        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, c.embed_dim) * 1e-6)
        self.register_token = nn.Parameter(torch.randn(1, 2, c.num_register_tokens, c.embed_dim) * 1e-6)
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1), persistent=False)

    @property
    def patch_start_idx(self) -> int:
        return self.config.patch_start_idx

    def embed(self, images: Tensor, frame_offset: FrameOffset) -> Tensor:
        """Tokens [B*S, P, D] of images [B, S, 3, H, W] in [0, 1].

        frame_offset: stream index of images[:, 0] - one int for all rows, or one per row (when
        several streams share a step).
        """
        B, S, _, H, W = images.shape
        x = ((images - self._mean.to(images.dtype)) / self._std.to(images.dtype)).reshape(B * S, 3, H, W)
        patches = self.patch_embed(x)
        # Which special-token variant each frame gets: 0 for its stream's first frame, else 1. Made
        # where the offsets are (host ints) and sent without a host wait (see model/transfer.py).
        offsets = torch.as_tensor(frame_offset).reshape(-1, 1).expand(B, 1)
        variant = (torch.arange(S, device=offsets.device)[None, :] + offsets > 0).long()  # [B, S]
        variant = to_device_nonblocking(variant, images.device)
        camera = self.camera_token[0, variant].to(patches.dtype)  # [B, S, 1, D]
        registers = self.register_token[0, variant].to(patches.dtype)  # [B, S, R, D]
        special = torch.cat([camera, registers], dim=2)
        return torch.cat([special.reshape(B * S, -1, patches.shape[-1]), patches], dim=1)

    def step_frames(self) -> Optional[int]:
        """Streams x frames of the step running now (or of the last one; None before any): how
        big a global block's call is (CUDA graphs are kept to small ones, cuda_graphs.py)."""
        if not self._positions:
            return None
        _, _, streams, frames, _, _ = self._positions[0]
        return streams * frames

    def _token_positions(self, grid_h: int, grid_w: int, B: int, S: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Token positions for frame attention [B*S, P, 2] and global attention [B, S*P, 2].

        The same tensors again while the shape stays: RoPE sizes its tables by reading the largest
        position from the GPU once per positions tensor it has not seen (a host synchronisation),
        which new tensors every step would repeat every step.
        """
        # Inference-mode tensors may not be saved for backward (training indexes with these).
        key = (grid_h, grid_w, B, S, str(device), torch.is_inference_mode_enabled())
        if self._positions and self._positions[0] == key:
            return self._positions[1], self._positions[2]
        pos = frame_token_positions(grid_h, grid_w, self.config.patch_start_idx, device)
        frame_pos = pos.unsqueeze(0).expand(B * S, -1, -1)
        global_pos = pos.unsqueeze(0).expand(B * S, -1, -1).reshape(B, S * pos.shape[0], 2)
        if not compiling_or_exporting():  # never keep a tracer's tensors
            self._positions = (key, frame_pos, global_pos)
        return frame_pos, global_pos

    def forward(
        self,
        images: Tensor,
        frame_offset: FrameOffset = 0,
        global_attention: Optional[GlobalAttention] = None,
        keep_layers: Optional[Sequence[int]] = None,
    ) -> list[Optional[Tensor]]:
        """Run all blocks on images [B, S, 3, H, W].

        Returns one entry per layer: frame and global outputs concatenated, [B, S, P, 2D]; layers
        not in ``keep_layers`` (default: all) are None so their memory is freed at once.
        """
        c = self.config
        B, S, _, H, W = images.shape
        tokens = self.embed(images, frame_offset)
        P, D = tokens.shape[1], tokens.shape[2]
        frame_pos, global_pos = self._token_positions(H // c.patch_size, W // c.patch_size, B, S, images.device)
        global_attention = global_attention or DenseGlobalAttention()
        keep = set(range(c.depth)) if keep_layers is None else set(keep_layers)

        outputs: list[Optional[Tensor]] = []
        frame_idx = global_idx = 0
        for _ in range(c.depth // c.aa_block_size):
            frame_out: list[Tensor] = []
            global_out: list[Tensor] = []
            for kind in c.aa_order:
                for _ in range(c.aa_block_size):
                    if kind == "frame":
                        tokens = self.frame_blocks[frame_idx](tokens.reshape(B * S, P, D), pos=frame_pos)
                        frame_out.append(tokens.reshape(B, S, P, D))
                        frame_idx += 1
                    else:
                        attend = _bind_layer(global_attention, global_idx)
                        tokens = self.global_blocks[global_idx](tokens.reshape(B, S * P, D), pos=global_pos, attend=attend)
                        global_out.append(tokens.reshape(B, S, P, D))
                        global_idx += 1
            for f, g in zip(frame_out, global_out):
                layer = len(outputs)
                outputs.append(torch.cat([f, g], dim=-1) if layer in keep else None)
        return outputs


def _bind_layer(global_attention: GlobalAttention, layer: int) -> AttendFn:
    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return global_attention.attend(layer, q, k, v)

    return attend
