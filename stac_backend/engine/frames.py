"""Validation and conversion of the frames a client pushes into a stream.

Every check raises a ``ValueError`` that names the problem, before anything touches a stream's
state, so bad input never corrupts a stream.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..model.transfer import to_device_nonblocking

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Floats are images in [0, 1]; a little slack absorbs resampling overshoot.
RANGE_SLACK = 1e-3

FrameInput = Union[Tensor, np.ndarray]


def to_frame_tensor(
    frames: FrameInput,
    patch_size: int,
    max_frames: int,
    expected_hw: Optional[tuple[int, int]] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Check frames [C, 3, H, W] (uint8 0..255 or float 0..1) and return float frames on ``device``."""
    if isinstance(frames, np.ndarray):
        if frames.dtype == np.uint8 or np.issubdtype(frames.dtype, np.floating):
            frames = torch.from_numpy(np.ascontiguousarray(frames))
        else:
            raise ValueError(f"unsupported frame dtype {frames.dtype}: use uint8 (0..255) or float (0..1)")
    if not isinstance(frames, Tensor):
        raise ValueError(f"frames must be a torch tensor or numpy array, got {type(frames).__name__}")
    if frames.dtype != torch.uint8 and frames.dtype not in FLOAT_DTYPES:
        raise ValueError(f"unsupported frame dtype {frames.dtype}: use uint8 (0..255) or float (0..1)")
    if frames.dim() != 4:
        raise ValueError(f"frames must have rank 4 [frames, 3, H, W], got rank {frames.dim()} {tuple(frames.shape)}")
    count, channels, height, width = frames.shape
    if count == 0:
        raise ValueError("a chunk needs at least one frame, got 0")
    if count > max_frames:
        raise ValueError(f"a chunk holds at most {max_frames} frames (the stream's chunk size), got {count}")
    if channels != 3:
        raise ValueError(f"frames need 3 colour channels (RGB) in dim 1, got {channels}")
    if height < patch_size or width < patch_size or height % patch_size or width % patch_size:
        raise ValueError(f"frame height and width must be positive multiples of the patch size {patch_size}, got {height}x{width}")
    if expected_hw is not None and (height, width) != tuple(expected_hw):
        raise ValueError(f"frame size changed within the stream: {height}x{width}, stream is {expected_hw[0]}x{expected_hw[1]}")
    if frames.dtype == torch.uint8:
        out = to_device_nonblocking(frames, device).to(torch.float32) / 255.0
    else:
        if not bool(torch.isfinite(frames).all()):
            raise ValueError("frames contain non-finite values (NaN or inf)")
        lo, hi = float(frames.min()), float(frames.max())
        if lo < -RANGE_SLACK or hi > 1 + RANGE_SLACK:
            raise ValueError(f"float frames must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}] (uint8 input is also accepted)")
        out = to_device_nonblocking(frames, device).to(torch.float32).clamp_(0.0, 1.0)
    return out.to(dtype)
