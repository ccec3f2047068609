"""Pose encoding <-> camera matrices.

Pose encoding (9 numbers): translation (3), rotation quaternion XYZW (scalar last, 4), vertical and
horizontal field of view in radians (2). Extrinsics are OpenCV camera-from-world [R | t] with the
first frame as the world frame; intrinsics put the principal point at the image centre and use
f = (size / 2) / tan(fov / 2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


MIN_FOV = 1e-4  # radians


def quaternion_to_matrix(quat_xyzw: Tensor) -> Tensor:
    """Rotation matrices [..., 3, 3] from quaternions [..., 4] (XYZW, need not be unit length)."""
    x, y, z, w = torch.unbind(quat_xyzw, dim=-1)
    two_s = 2.0 / (quat_xyzw * quat_xyzw).sum(dim=-1)
    rows = (
        1 - two_s * (y * y + z * z), two_s * (x * y - z * w), two_s * (x * z + y * w),
        two_s * (x * y + z * w), 1 - two_s * (x * x + z * z), two_s * (y * z - x * w),
        two_s * (x * z - y * w), two_s * (y * z + x * w), 1 - two_s * (x * x + y * y),
    )
    return torch.stack(rows, dim=-1).reshape(quat_xyzw.shape[:-1] + (3, 3))


def matrix_to_quaternion(rotation: Tensor) -> Tensor:
    """Unit quaternions [..., 4] (XYZW, w >= 0) from rotation matrices [..., 3, 3]."""
    m = rotation
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    # Four candidate solutions; pick the numerically best (largest denominator) per matrix.
    q_abs = torch.sqrt(
        torch.clamp(
            torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1),
            min=0.0,
        )
    )  # |w|, |x|, |y|, |z| times 2
    candidates = torch.stack(
        [
            torch.stack([q_abs[..., 0] ** 2, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
            torch.stack([m[..., 2, 1] - m[..., 1, 2], q_abs[..., 1] ** 2, m[..., 1, 0] + m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0]], -1),
            torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] + m[..., 0, 1], q_abs[..., 2] ** 2, m[..., 2, 1] + m[..., 1, 2]], -1),
            torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 2, 0] + m[..., 0, 2], m[..., 2, 1] + m[..., 1, 2], q_abs[..., 3] ** 2], -1),
        ],
        dim=-2,
    )  # [..., 4 candidates, (w, x, y, z)]
    candidates = candidates / (2.0 * q_abs[..., None].clamp(min=0.1))
    best = q_abs.argmax(dim=-1)
    wxyz = torch.gather(candidates, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    wxyz = wxyz * torch.where(wxyz[..., :1] < 0, -1.0, 1.0)
    return torch.cat([wxyz[..., 1:], wxyz[..., :1]], dim=-1)


def pose_encoding_to_extri_intri(pose_encoding: Tensor, image_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Extrinsics [..., 3, 4] and intrinsics [..., 3, 3] from pose encodings [..., 9]."""
    H, W = image_hw
    t, quat = pose_encoding[..., :3], pose_encoding[..., 3:7]
    # A zero field of view (the ReLU's floor) would mean an infinite focal length; keep it finite.
    fov_h = pose_encoding[..., 7].clamp(MIN_FOV, math.pi - MIN_FOV)
    fov_w = pose_encoding[..., 8].clamp(MIN_FOV, math.pi - MIN_FOV)
    extrinsics = torch.cat([quaternion_to_matrix(quat), t[..., None]], dim=-1)
    fy = (H / 2.0) / torch.tan(fov_h / 2.0)
    fx = (W / 2.0) / torch.tan(fov_w / 2.0)
    intrinsics = torch.zeros(pose_encoding.shape[:-1] + (3, 3), dtype=pose_encoding.dtype, device=pose_encoding.device)
    intrinsics[..., 0, 0], intrinsics[..., 1, 1] = fx, fy
    intrinsics[..., 0, 2], intrinsics[..., 1, 2], intrinsics[..., 2, 2] = W / 2.0, H / 2.0, 1.0
    return extrinsics, intrinsics


def extri_intri_to_pose_encoding(extrinsics: Tensor, intrinsics: Tensor, image_hw: tuple[int, int]) -> Tensor:
    """Pose encodings [..., 9] from extrinsics [..., 3, 4] and intrinsics [..., 3, 3]."""
    H, W = image_hw
    quat = matrix_to_quaternion(extrinsics[..., :3, :3])
    fov_h = 2 * torch.atan((H / 2.0) / intrinsics[..., 1, 1])
    fov_w = 2 * torch.atan((W / 2.0) / intrinsics[..., 0, 0])
    return torch.cat([extrinsics[..., :3, 3], quat, fov_h[..., None], fov_w[..., None]], dim=-1)


def camera_centers(extrinsics: Tensor) -> Tensor:
    """World positions [..., 3] of cameras with camera-from-world extrinsics [..., 3, 4]."""
    R, t = extrinsics[..., :3, :3], extrinsics[..., :3, 3:]
    return -(R.transpose(-1, -2) @ t)[..., 0]
