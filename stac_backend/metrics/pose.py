"""Camera pose quality: ATE RMSE and RPE (translation, rotation in degrees).

Inputs are OpenCV camera-from-world extrinsics ``[S, 3, 4]`` (or ``[S, 4, 4]``), the convention of
VGGT and of ``stac_backend.data``. Protocol (as in the TUM-dynamics / ScanNet / Sintel evaluations
of MonST3R, CUT3R, StreamVGGT, which use evo): the predicted trajectory is aligned to the GT by a
Umeyama Sim(3) on the camera centres, then

* ATE RMSE = RMS distance between aligned predicted and GT camera centres;
* RPE over consecutive frames (``delta = 1``): with world-from-camera poses ``P`` (pred, aligned)
  and ``Q`` (GT), ``E_i = (Q_i^-1 Q_{i+delta})^-1 (P_i^-1 P_{i+delta})``; RPE translation is the
  RMS of ``|t(E_i)|`` and RPE rotation the RMS of the rotation angle of ``E_i`` in degrees.

Distances are in GT units (metres).
"""

from __future__ import annotations

import math

import torch

from ._tensors import as_tensor
from .alignment import Sim3, umeyama

__all__ = [
    "camera_centers",
    "world_from_camera",
    "align_trajectories",
    "ate_rmse",
    "relative_pose_errors",
    "pose_metrics",
    "rotation_angle",
    "POSE_ALIGN_MODES",
]

POSE_ALIGN_MODES = ("sim3", "se3", "none")


def _extrinsics(value, name: str) -> torch.Tensor:
    e = as_tensor(value, name, ndim=3)
    if e.shape[1:] not in ((3, 4), (4, 4)):
        raise ValueError(f"{name} must be [S, 3, 4] or [S, 4, 4], got {tuple(e.shape)}")
    return e[:, :3, :4].to(torch.float64)


def camera_centers(extrinsics: torch.Tensor) -> torch.Tensor:
    """Camera centres ``[S, 3]`` (``-R^T t``) of camera-from-world extrinsics."""
    e = _extrinsics(extrinsics, "extrinsics")
    return -(e[:, :3, :3].transpose(1, 2) @ e[:, :3, 3:]).squeeze(-1)


def world_from_camera(extrinsics: torch.Tensor) -> torch.Tensor:
    """4x4 world-from-camera poses ``[S, 4, 4]`` (float64) from camera-from-world extrinsics."""
    e = _extrinsics(extrinsics, "extrinsics")
    pose = torch.zeros(e.shape[0], 4, 4, dtype=torch.float64, device=e.device)
    rotation_t = e[:, :3, :3].transpose(1, 2)
    pose[:, :3, :3] = rotation_t
    pose[:, :3, 3] = -(rotation_t @ e[:, :3, 3:]).squeeze(-1)
    pose[:, 3, 3] = 1.0
    return pose


def rotation_angle(rotation: torch.Tensor) -> torch.Tensor:
    """Rotation angle in radians of ``[..., 3, 3]`` rotations.

    Uses ``atan2(|axis * sin|, cos)`` rather than ``acos((trace - 1) / 2)``: acos is ill-conditioned
    near 0, where the small per-frame RPE angles live.
    """
    cos = (rotation.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0
    skew = torch.stack(
        [
            rotation[..., 2, 1] - rotation[..., 1, 2],
            rotation[..., 0, 2] - rotation[..., 2, 0],
            rotation[..., 1, 0] - rotation[..., 0, 1],
        ],
        dim=-1,
    )
    sin = 0.5 * skew.norm(dim=-1)
    return torch.atan2(sin, cos)


def align_trajectories(pred_extrinsics: torch.Tensor, gt_extrinsics: torch.Tensor, mode: str = "sim3") -> Sim3:
    """Transform of the predicted world onto the GT world from camera centres.

    ``mode``: "sim3" (Umeyama with scale), "se3" (rigid) or "none" (identity). Needs at least three
    frames for "sim3"/"se3".
    """
    if mode not in POSE_ALIGN_MODES:
        raise ValueError(f"align must be one of {POSE_ALIGN_MODES}, got {mode!r}")
    pred_c = camera_centers(pred_extrinsics)
    gt_c = camera_centers(gt_extrinsics).to(pred_c.device)
    if pred_c.shape != gt_c.shape:
        raise ValueError(f"pred and gt must have the same number of frames, got {pred_c.shape[0]} and {gt_c.shape[0]}")
    if mode == "none":
        return Sim3.identity(pred_c.device, torch.float64)
    if pred_c.shape[0] < 3:
        raise ValueError(f"trajectory alignment needs at least 3 frames, got {pred_c.shape[0]}")
    return umeyama(pred_c, gt_c, with_scale=(mode == "sim3"))


def _apply_to_poses(transform: Sim3, poses: torch.Tensor) -> torch.Tensor:
    """Apply a world similarity to world-from-camera poses (rotation composed, centre mapped)."""
    out = poses.clone()
    out[:, :3, :3] = transform.rotation @ poses[:, :3, :3]
    out[:, :3, 3] = transform.apply(poses[:, :3, 3])
    return out


def ate_rmse(pred_extrinsics: torch.Tensor, gt_extrinsics: torch.Tensor, *, align: str = "sim3") -> float:
    """Absolute trajectory error: RMS camera-centre distance after alignment (GT units)."""
    transform = align_trajectories(pred_extrinsics, gt_extrinsics, align)
    pred_c = transform.apply(camera_centers(pred_extrinsics))
    gt_c = camera_centers(gt_extrinsics).to(pred_c.device)
    return float((pred_c - gt_c).square().sum(-1).mean().sqrt())


def relative_pose_errors(
    pred_extrinsics: torch.Tensor, gt_extrinsics: torch.Tensor, *, delta: int = 1, align: str = "sim3"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair RPE: translation errors (GT units) and rotation errors (degrees), ``[S - delta]`` each.

    Only the scale of the alignment matters here (relative motions do not change under a rigid
    change of world frame), but the full alignment is applied for clarity.
    """
    if delta <= 0:
        raise ValueError(f"delta must be positive, got {delta}")
    pred_poses = world_from_camera(pred_extrinsics)
    gt_poses = world_from_camera(gt_extrinsics).to(pred_poses.device)
    if pred_poses.shape != gt_poses.shape:
        raise ValueError("pred and gt must have the same number of frames")
    if pred_poses.shape[0] <= delta:
        raise ValueError(f"RPE needs more than delta={delta} frames, got {pred_poses.shape[0]}")
    pred_poses = _apply_to_poses(align_trajectories(pred_extrinsics, gt_extrinsics, align), pred_poses)
    pred_rel = torch.linalg.inv(pred_poses[:-delta]) @ pred_poses[delta:]
    gt_rel = torch.linalg.inv(gt_poses[:-delta]) @ gt_poses[delta:]
    error = torch.linalg.inv(gt_rel) @ pred_rel
    return error[:, :3, 3].norm(dim=-1), rotation_angle(error[:, :3, :3]) * (180.0 / math.pi)


def pose_metrics(
    pred_extrinsics: torch.Tensor, gt_extrinsics: torch.Tensor, *, align: str = "sim3", delta: int = 1
) -> dict[str, float]:
    """``ate_rmse``, ``rpe_trans`` (RMS, GT units) and ``rpe_rot_deg`` (RMS, degrees)."""
    trans, rot = relative_pose_errors(pred_extrinsics, gt_extrinsics, delta=delta, align=align)
    return {
        "ate_rmse": ate_rmse(pred_extrinsics, gt_extrinsics, align=align),
        "rpe_trans": float(trans.square().mean().sqrt()),
        "rpe_rot_deg": float(rot.square().mean().sqrt()),
    }
