"""Pinhole camera geometry in the conventions VGGT uses.

Conventions (shared by every module in ``stac_backend.data``):

* Extrinsics are OpenCV camera-from-world matrices ``[R | t]`` of shape ``[..., 3, 4]``:
  ``x_cam = R @ x_world + t`` with camera axes x right, y down, z forward.
* Intrinsics ``[..., 3, 3]`` have square pixels, ``f = (W / 2) / tan(fov_x / 2)`` and the principal
  point at ``(W / 2, H / 2)``.
* Pixel ``(row i, column j)`` sits at image coordinate ``(u, v) = (j, i)``. This is the convention of
  VGGT's ``unproject_depth_map_to_point_map`` (``meshgrid(arange(W), arange(H))``), so ground-truth
  point maps made here agree with what the VGGT utilities compute from our depth and cameras.
* Depth is z-depth along the optical axis, in metres.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "intrinsics_from_fov",
    "look_at_extrinsics",
    "camera_centers",
    "invert_extrinsics",
    "to_homogeneous",
    "pixel_grid",
    "unproject_depth",
    "project_points",
]


def intrinsics_from_fov(
    fov_x_deg: float,
    height: int,
    width: int,
    num_frames: int = 1,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Intrinsics ``[num_frames, 3, 3]`` for a horizontal field of view in degrees.

    Pixels are square (fx == fy); the vertical field of view follows from the aspect ratio.
    """
    if not 0.0 < fov_x_deg < 180.0:
        raise ValueError(f"fov_x_deg must be in (0, 180), got {fov_x_deg}")
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    focal = (width / 2.0) / math.tan(math.radians(fov_x_deg) / 2.0)
    k = torch.tensor(
        [[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]],
        device=device,
        dtype=dtype,
    )
    return k.expand(num_frames, 3, 3).clone()


def look_at_extrinsics(eye: torch.Tensor, target: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """OpenCV camera-from-world extrinsics ``[S, 3, 4]`` for cameras at ``eye`` looking at ``target``.

    ``eye`` and ``target`` are ``[S, 3]``; ``up`` is the world up direction ``[3]``. The camera's
    y axis (down in the image) is chosen to point against ``up``, so images are upright.
    """
    if eye.shape != target.shape or eye.ndim != 2 or eye.shape[-1] != 3:
        raise ValueError(f"eye and target must both be [S, 3], got {tuple(eye.shape)} and {tuple(target.shape)}")
    forward = target - eye
    norm = forward.norm(dim=-1, keepdim=True)
    if bool((norm < 1e-9).any()):
        raise ValueError("look_at: a target coincides with its eye position")
    forward = forward / norm
    up = up.to(eye).expand_as(forward)
    right = torch.linalg.cross(forward, up, dim=-1)
    right_norm = right.norm(dim=-1, keepdim=True)
    if bool((right_norm < 1e-6).any()):
        raise ValueError("look_at: viewing direction is parallel to the up vector")
    right = right / right_norm
    down = torch.linalg.cross(forward, right, dim=-1)
    # Rows of the camera-from-world rotation are the camera axes expressed in world coordinates.
    rotation = torch.stack([right, down, forward], dim=-2)
    translation = -(rotation @ eye.unsqueeze(-1))
    return torch.cat([rotation, translation], dim=-1)


def camera_centers(extrinsics: torch.Tensor) -> torch.Tensor:
    """Camera centres in world coordinates ``[..., 3]`` from camera-from-world ``[..., 3, 4]``."""
    rotation, translation = extrinsics[..., :3, :3], extrinsics[..., :3, 3:]
    return -(rotation.transpose(-1, -2) @ translation).squeeze(-1)


def to_homogeneous(extrinsics: torch.Tensor) -> torch.Tensor:
    """``[..., 3, 4]`` -> ``[..., 4, 4]`` by appending the row ``[0, 0, 0, 1]``."""
    bottom = torch.zeros(*extrinsics.shape[:-2], 1, 4, device=extrinsics.device, dtype=extrinsics.dtype)
    bottom[..., 0, 3] = 1.0
    return torch.cat([extrinsics[..., :3, :4], bottom], dim=-2)


def invert_extrinsics(extrinsics: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid ``[..., 3, 4]`` transforms (camera-from-world <-> world-from-camera)."""
    rotation, translation = extrinsics[..., :3, :3], extrinsics[..., :3, 3:]
    rotation_t = rotation.transpose(-1, -2)
    return torch.cat([rotation_t, -(rotation_t @ translation)], dim=-1)


def pixel_grid(height: int, width: int, *, device: torch.device | str = "cpu", dtype=torch.float32):
    """Pixel coordinates ``(u, v)`` each ``[H, W]``, with pixel ``(i, j)`` at ``(j, i)``."""
    v, u = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype),
        torch.arange(width, device=device, dtype=dtype),
        indexing="ij",
    )
    return u, v


def unproject_depth(depth: torch.Tensor, extrinsics: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """World points ``[S, H, W, 3]`` from z-depth ``[S, H, W]`` and cameras ``[S, 3, 4]``, ``[S, 3, 3]``."""
    if depth.ndim != 3:
        raise ValueError(f"depth must be [S, H, W], got {tuple(depth.shape)}")
    num_frames, height, width = depth.shape
    if extrinsics.shape != (num_frames, 3, 4) or intrinsics.shape != (num_frames, 3, 3):
        raise ValueError("extrinsics/intrinsics must be [S, 3, 4] / [S, 3, 3] matching depth")
    u, v = pixel_grid(height, width, device=depth.device, dtype=depth.dtype)
    fx, fy = intrinsics[:, 0, 0, None, None], intrinsics[:, 1, 1, None, None]
    cx, cy = intrinsics[:, 0, 2, None, None], intrinsics[:, 1, 2, None, None]
    cam = torch.stack([(u - cx) / fx * depth, (v - cy) / fy * depth, depth], dim=-1)
    cam_from_world = extrinsics.to(depth.dtype)
    rotation, translation = cam_from_world[:, None, None, :3, :3], cam_from_world[:, None, None, :3, 3]
    # x_world = R^T (x_cam - t)
    return ((cam - translation).unsqueeze(-2) @ rotation).squeeze(-2)


def project_points(
    points: torch.Tensor, extrinsics: torch.Tensor, intrinsics: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project world points ``[S, ..., 3]`` into their frames.

    Returns pixel coordinates ``[S, ..., 2]`` (u, v) and z-depth ``[S, ..., 1]`` in camera ``S``.
    """
    num_frames = points.shape[0]
    if extrinsics.shape != (num_frames, 3, 4) or intrinsics.shape != (num_frames, 3, 3):
        raise ValueError("extrinsics/intrinsics must be [S, 3, 4] / [S, 3, 3] matching points")
    extra = (1,) * (points.ndim - 2)
    rotation = extrinsics[:, :3, :3].reshape(num_frames, *extra, 3, 3)
    translation = extrinsics[:, :3, 3].reshape(num_frames, *extra, 3)
    cam = (rotation @ points.unsqueeze(-1)).squeeze(-1) + translation
    z = cam[..., 2:3]
    k = intrinsics.reshape(num_frames, *extra, 3, 3)
    uv = torch.cat(
        [k[..., 0, 0:1] * cam[..., 0:1] / z + k[..., 0, 2:3], k[..., 1, 1:2] * cam[..., 1:2] / z + k[..., 1, 2:3]],
        dim=-1,
    )
    return uv, z
