"""The field's quality metrics for streaming 3D reconstruction, in torch (CPU or CUDA).

* ``alignment``: Umeyama Sim(3) / rigid fits and point-to-point ICP.
* ``reconstruction``: accuracy, completeness, normal consistency (7-Scenes / NRGBD protocol).
* ``depth``: Abs Rel and delta < 1.25 after median scale alignment, depth capped at 70 m.
* ``pose``: ATE RMSE, RPE translation / rotation after Sim(3) alignment; over every pair of frames,
  rotation and translation-direction errors and their AUC@30 (VGGT's camera metric).
* ``evaluate_sequence``: all of the above for one predicted sequence, as one flat dict.

Conventions: cameras are OpenCV camera-from-world extrinsics ``[S, 3, 4]``; distances are reported
in ground-truth units (metres); angles in degrees.
"""

from .alignment import IcpResult, Sim3, icp, umeyama
from .depth import depth_metrics, median_scale
from .evaluate import evaluate_sequence
from .neighbors import nearest_neighbors, subsample, subsample_indices
from .pose import (align_trajectories, ate_rmse, camera_centers, pair_angle_errors, pose_auc, pose_metrics,
                   relative_pose_errors, world_from_camera)
from .reconstruction import accuracy_completeness, align_point_maps, point_map_normals, reconstruction_metrics

__all__ = [
    "Sim3",
    "umeyama",
    "icp",
    "IcpResult",
    "nearest_neighbors",
    "subsample",
    "subsample_indices",
    "point_map_normals",
    "accuracy_completeness",
    "align_point_maps",
    "reconstruction_metrics",
    "depth_metrics",
    "median_scale",
    "camera_centers",
    "world_from_camera",
    "align_trajectories",
    "ate_rmse",
    "relative_pose_errors",
    "pair_angle_errors",
    "pose_auc",
    "pose_metrics",
    "evaluate_sequence",
]
