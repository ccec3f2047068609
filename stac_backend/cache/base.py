"""The interface between a stream and the policy that manages its global-attention key/value cache.

A ``CachePolicy`` instance belongs to one stream. The model calls ``attend(layer, q, k, v)`` at each
global-attention layer of a step (q, k, v after q/k norm and RoPE, [B, heads, N_step, head_dim]);
the policy decides which keys/values of earlier steps take part, stores what it wants to keep of
the new ones, and returns the attention output. After the heads have run, the engine calls
``end_step(info)`` so the policy can do its end-of-step work (score decay, pruning, pooling) with
the step's predictions at hand (e.g. world points, for spatial policies).

Policies know nothing of Triton or of the model beyond this contract; the model knows nothing of
policies beyond ``attend``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

from torch import Tensor


@dataclass
class StepInfo:
    """What a policy may use at the end of a step."""

    frame_offset: int  # stream index of the step's first frame
    num_frames: int  # frames in this step (the chunk)
    tokens_per_frame: int
    patch_start_idx: int  # index of the first patch token in a frame
    grid_hw: tuple[int, int]  # patch grid (rows, cols)
    world_points: Optional[Tensor] = None  # [B, C, H, W, 3] point-head output
    world_points_conf: Optional[Tensor] = None  # [B, C, H, W]


class CachePolicy(ABC):
    """One stream's global-attention cache under some retention rule."""

    #: short name used in configs, logs and benchmark files
    name: str = "base"

    @abstractmethod
    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention of the step's queries over retained past keys plus the step's own keys."""

    def end_step(self, info: StepInfo) -> None:
        """End-of-step maintenance; the default keeps everything as stored by ``attend``."""

    @abstractmethod
    def memory_bytes(self) -> int:
        """Bytes of every tensor this policy holds for its stream, exactly."""

    @abstractmethod
    def reset(self) -> None:
        """Forget the stream (free all memory)."""

    def stats(self) -> dict:
        """Numbers for logs and metrics (tokens retained, evictions, ...)."""
        return {"memory_bytes": self.memory_bytes()}
