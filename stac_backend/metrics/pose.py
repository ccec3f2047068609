"""Camera pose quality: ATE RMSE and RPE (translation, rotation in degrees).

Inputs are OpenCV camera-from-world extrinsics ``[S, 3, 4]`` (or ``[S, 4, 4]``), the convention of
VGGT and of ``stac_backend.data``. Protocol (as in the TUM-dynamics / ScanNet / Sintel evaluations
of MonST3R, CUT3R, StreamVGGT, which use evo): the predicted trajectory is aligned to the GT by a
Umeyama Sim(3) on the camera centres, then

* ATE RMSE = RMS distance between aligned predicted and GT camera centres;
* RPE over consecutive frames (``delta = 1``): with world-from-camera poses ``P`` (pred, aligned)
  and ``Q`` (GT), ``E_i = (Q_i^-1 Q_{i+delta})^-1 (P_i^-1 P_{i+delta})``; RPE translation is the
  RMS of ``|t(E_i)|`` and RPE rotation the RMS of the rotation angle of ``E_i`` in degrees.

Over every pair of frames (VGGT's camera protocol, from PoseDiffusion), with no alignment at all:
the relative pose of frames ``i < j`` is ``E_i E_j^-1``; its rotation error is the angle between
the predicted and true relative rotations, its translation error the angle between the predicted
and true relative translation directions, up to sign (``min(a, 180 - a)``: the direction of a
baseline is what a scale-free prediction can get right). ``pose_auc_30`` is the area under the
accuracy curve of ``max(rotation, translation)`` error for thresholds of 1 to 30 degrees (the mean
over ``k = 1..30`` of the fraction of pairs below ``k``), in [0, 1]; VGGT reports it x 100. Unlike
the ATE, which scores camera centres only, it is as strict on where a camera looks as on where it is.

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
    "pair_angle_errors",
    "pose_auc",
    "POSE_ALIGN_MODES",
    "PAIR_MAX_FRAMES",
]

POSE_ALIGN_MODES = ("sim3", "se3", "none")
# The pairwise metrics grow with the square of the frames: longer streams are scored on this many
# evenly spaced frames (at most 79,800 pairs), so that time and memory stay bounded at any length.
PAIR_MAX_FRAMES = 400


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


def _pair_frames(num_frames: int, max_frames: int) -> torch.Tensor:
    if num_frames <= max_frames:
        return torch.arange(num_frames)
    return torch.linspace(0, num_frames - 1, max_frames, dtype=torch.float64).round().long()


def pair_angle_errors(
    pred_extrinsics: torch.Tensor, gt_extrinsics: torch.Tensor, *, max_frames: int = PAIR_MAX_FRAMES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation and translation-direction errors (degrees) of every pair ``i < j`` of frames, each
    ``[P]`` (the module docstring says how). Streams longer than ``max_frames`` are scored on that
    many evenly spaced frames. A pair whose true baseline is zero (a camera back at an earlier
    pose) has no direction to get right: its translation error is 0 and its rotation alone counts."""
    pred = world_from_camera(pred_extrinsics)
    gt = world_from_camera(gt_extrinsics).to(pred.device)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same number of frames, got {pred.shape[0]} and {gt.shape[0]}")
    if pred.shape[0] < 2:
        raise ValueError(f"pair errors need at least 2 frames, got {pred.shape[0]}")
    if max_frames < 2:
        raise ValueError(f"max_frames must be >= 2, got {max_frames}")
    keep = _pair_frames(pred.shape[0], max_frames).to(pred.device)
    first, second = torch.triu_indices(len(keep), len(keep), offset=1, device=pred.device)
    first, second = keep[first], keep[second]

    def relative(poses: torch.Tensor) -> torch.Tensor:
        # camera_i-from-camera_j = (world-from-camera_i)^-1 (world-from-camera_j) = E_i E_j^-1
        return torch.linalg.inv(poses[first]) @ poses[second]

    rel_pred, rel_gt = relative(pred), relative(gt)
    rotation = rotation_angle(rel_pred[:, :3, :3].transpose(1, 2) @ rel_gt[:, :3, :3]) * (180.0 / math.pi)
    t_pred, t_gt = rel_pred[:, :3, 3], rel_gt[:, :3, 3]
    # atan2(|a x b|, |a . b|) in [0, 90]: the angle up to sign, well conditioned near 0 (acos is not)
    translation = torch.rad2deg(torch.atan2(torch.linalg.cross(t_pred, t_gt).norm(dim=-1), (t_pred * t_gt).sum(-1).abs()))
    gt_length, pred_length = t_gt.norm(dim=-1), t_pred.norm(dim=-1)
    no_prediction = pred_length <= 1e-12 * pred_length.max().clamp(min=1e-300)  # no direction given: the worst
    translation = torch.where(no_prediction, torch.full_like(translation, 90.0), translation)
    degenerate = gt_length <= 1e-9 * gt_length.max().clamp(min=1e-300)
    return rotation, torch.where(degenerate, torch.zeros_like(translation), translation)


def pose_auc(rotation_deg: torch.Tensor, translation_deg: torch.Tensor, max_threshold: int = 30) -> float:
    """Area under the accuracy curve of ``max(rotation, translation)`` pair errors, thresholds 1 to
    ``max_threshold`` degrees, in [0, 1] (VGGT's AUC@30 / 100)."""
    if max_threshold < 1:
        raise ValueError(f"max_threshold must be >= 1, got {max_threshold}")
    worst = torch.maximum(rotation_deg, translation_deg)
    if worst.numel() == 0:
        raise ValueError("pose_auc needs at least one pair")
    below = [(worst < k).double().mean() for k in range(1, max_threshold)]
    below.append((worst <= max_threshold).double().mean())  # the last histogram bin is closed
    return float(torch.stack(below).mean())


def pose_metrics(
    pred_extrinsics: torch.Tensor, gt_extrinsics: torch.Tensor, *, align: str = "sim3", delta: int = 1
) -> dict[str, float]:
    """``ate_rmse``, ``rpe_trans`` (RMS, GT units) and ``rpe_rot_deg`` (RMS, degrees); over every
    pair of frames, ``pose_auc_30`` and the median rotation / translation-direction errors
    ``pair_rot_deg`` / ``pair_trans_deg`` (no alignment: ``pair_angle_errors``)."""
    trans, rot = relative_pose_errors(pred_extrinsics, gt_extrinsics, delta=delta, align=align)
    pair_rot, pair_trans = pair_angle_errors(pred_extrinsics, gt_extrinsics)
    return {
        "ate_rmse": ate_rmse(pred_extrinsics, gt_extrinsics, align=align),
        "rpe_trans": float(trans.square().mean().sqrt()),
        "rpe_rot_deg": float(rot.square().mean().sqrt()),
        "pose_auc_30": pose_auc(pair_rot, pair_trans, 30),
        "pair_rot_deg": float(pair_rot.median()),
        "pair_trans_deg": float(pair_trans.median()),
    }
