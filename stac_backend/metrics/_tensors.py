"""Small input helpers shared by the metric modules (not part of the public API)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def as_tensor(value: Any, name: str, *, trailing: tuple[int, ...] = (), ndim: int | None = None) -> torch.Tensor:
    """Convert arrays/tensors to a floating torch tensor and check its shape.

    ``trailing`` fixes the last dimensions (e.g. ``(3,)`` for points); ``ndim`` the total rank.
    Integer or bool inputs become float32; floating inputs keep their dtype and device.
    """
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    elif not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value)
    if not value.is_floating_point():
        value = value.to(torch.float32)
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if trailing and tuple(value.shape[-len(trailing):]) != trailing:
        raise ValueError(f"{name} must end with dimensions {trailing}, got shape {tuple(value.shape)}")
    return value


def as_mask(value: Any, name: str, shape: torch.Size | tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Convert a mask to a bool tensor of ``shape`` on ``device``."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    value = torch.as_tensor(value, device=device)
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    return value.to(torch.bool)


def median(values: torch.Tensor) -> torch.Tensor:
    """Median of a 1D tensor; the mean of the two middle values for even counts (as numpy)."""
    if values.numel() == 0:
        raise ValueError("median of an empty tensor")
    ordered = values.flatten().sort().values
    n = ordered.numel()
    return 0.5 * (ordered[(n - 1) // 2] + ordered[n // 2])
