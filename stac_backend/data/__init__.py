"""Synthetic streaming scenes with exact ground truth (procedural rooms, ray-cast in torch).

Conventions: metres; z-depth along the optical axis; OpenCV camera-from-world extrinsics
``[S, 3, 4]`` (x right, y down, z forward); intrinsics with the principal point at ``(W/2, H/2)``
and pixel ``(i, j)`` at image coordinate ``(u, v) = (j, i)`` (as VGGT's unprojection). The world
frame is the scene frame (z up, floor z = 0) unless converted with ``to_first_camera_frame``
(VGGT's convention: camera 0 is the world frame).
"""

from .camera import (
    camera_centers,
    intrinsics_from_fov,
    invert_extrinsics,
    look_at_extrinsics,
    project_points,
    unproject_depth,
)
from .io import read_sequence, write_sequence
from .render import RenderOutput, render_frames
from .scene import Scene, make_scene
from .sequence import SyntheticSequence, make_sequence, to_first_camera_frame
from .splits import HELD_OUT_SEED, SPLIT_COUNT, SPLITS, VALIDATION_SEED, split_overlapping
from .trajectory import TRAJECTORIES, make_trajectory

__all__ = [
    "HELD_OUT_SEED",
    "VALIDATION_SEED",
    "SPLIT_COUNT",
    "SPLITS",
    "split_overlapping",
    "SyntheticSequence",
    "make_sequence",
    "to_first_camera_frame",
    "write_sequence",
    "read_sequence",
    "Scene",
    "make_scene",
    "render_frames",
    "RenderOutput",
    "make_trajectory",
    "TRAJECTORIES",
    "intrinsics_from_fov",
    "look_at_extrinsics",
    "camera_centers",
    "invert_extrinsics",
    "project_points",
    "unproject_depth",
]
