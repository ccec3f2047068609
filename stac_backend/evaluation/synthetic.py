"""Synthetic streams that revisit: several laps of the same loop, each lap its own frames.

``revisit_loop`` renders ``laps`` laps of the ``loop`` trajectory of ``stac_backend.data`` around one
room. Lap ``j`` samples the loop at offsets ``j / laps`` of a frame step from lap 0, so the second
lap passes the same places with slightly different views (not copies of earlier frames): a cache
that remembers the first lap can re-use it, one that forgot it has to map the room again.
"""

from __future__ import annotations

import torch

from ..data import SyntheticSequence, make_scene, make_trajectory, render_frames, to_first_camera_frame

__all__ = ["revisit_loop", "lap_segments"]


def revisit_loop(lap_frames: int, laps: int, height: int, width: int, seed: int, fov_deg: float = 60.0) -> SyntheticSequence:
    """``laps * lap_frames`` frames in camera 0's frame (VGGT's world frame), with ground truth."""
    if lap_frames < 2 or laps < 1:
        raise ValueError(f"need lap_frames >= 2 and laps >= 1, got {lap_frames}, {laps}")
    scene = make_scene(seed)
    # One lap sampled laps times as finely; lap j takes every laps-th sample starting at j.
    fine_extrinsics, fine_intrinsics = make_trajectory("loop", scene, laps * lap_frames + 1, height, width,
                                                       fov_deg=fov_deg, seed=seed)
    order = torch.tensor([laps * k + j for j in range(laps) for k in range(lap_frames)])
    extrinsics, intrinsics = fine_extrinsics[order], fine_intrinsics[order]
    rendered = render_frames(scene, extrinsics, intrinsics, height, width)
    seq = SyntheticSequence(images=rendered.images, depth=rendered.depth, valid=rendered.valid,
                            world_points=rendered.world_points, extrinsics=extrinsics, intrinsics=intrinsics,
                            metadata={"seed": seed, "trajectory": f"loop x{laps} laps", "lap_frames": lap_frames,
                                      "units": "metres", "scene": scene.describe()})
    return to_first_camera_frame(seq)


def lap_segments(lap_frames: int, laps: int) -> dict[str, tuple[int, int]]:
    """``{"lap_2": (start, stop), ...}``: the frames of every lap after the first (the revisits)."""
    return {f"lap_{j + 1}": (j * lap_frames, (j + 1) * lap_frames) for j in range(1, laps)}
