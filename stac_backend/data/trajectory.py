"""Camera trajectories through a procedural room, with revisits.

Every trajectory returns OpenCV camera-from-world extrinsics ``[S, 3, 4]`` in the scene's world
frame (metres, z up) and intrinsics ``[S, 3, 3]`` (principal point at ``(W/2, H/2)``, focal from the
horizontal field of view). Cameras stay inside the free band described in ``scene.py`` and always
look towards the middle of the room, so every frame sees the centre objects and the far walls.

* ``loop``: one lap of an ellipse around the room; the last frame's pose equals the first frame's
  (a loop closure).
* ``back_and_forth``: walk along one side of the room and come back on the same path; frame ``i``
  and frame ``S - 1 - i`` share their pose.
* ``random_walk``: a smooth random path (a few random low-frequency sinusoids) with a wandering
  gaze; no revisit is guaranteed.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .camera import intrinsics_from_fov, look_at_extrinsics
from .scene import CAMERA_MAX, CAMERA_MIN_RADIUS, Scene

__all__ = ["TRAJECTORIES", "make_trajectory", "loop_trajectory", "back_and_forth_trajectory", "random_walk_trajectory"]

WORLD_UP = (0.0, 0.0, 1.0)
_LOOP_RADIUS = 0.6  # fraction of the half extents


def _phase(num_frames: int) -> np.ndarray:
    """Frame times in [0, 1] with the last frame at exactly 1 (so periodic paths close)."""
    if num_frames == 1:
        return np.zeros(1)
    return np.arange(num_frames, dtype=np.float64) / (num_frames - 1)


def _finish(
    eye: np.ndarray, target: np.ndarray, height: int, width: int, fov_deg: float, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    # Poses are built in float64 then stored as float32, so revisited poses match to float32 rounding.
    extrinsics = look_at_extrinsics(
        torch.from_numpy(eye), torch.from_numpy(target), torch.tensor(WORLD_UP, dtype=torch.float64)
    )
    intrinsics = intrinsics_from_fov(fov_deg, height, width, eye.shape[0], device=device)
    return extrinsics.to(device=device, dtype=torch.float32), intrinsics


def _half_extents(scene: Scene) -> tuple[float, float, float]:
    half_x, half_y, _ = (0.5 * (scene.room_max - scene.room_min)).tolist()
    return half_x, half_y, float(scene.room_max[2] - scene.room_min[2])


def loop_trajectory(
    scene: Scene, num_frames: int, height: int, width: int, *, fov_deg: float = 60.0, seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One lap of an ellipse at 0.6 of the half extents, gently bobbing, looking at the centre."""
    rng = np.random.default_rng([seed, 1])
    half_x, half_y, _ = _half_extents(scene)
    start = rng.uniform(0.0, 2.0 * math.pi)
    direction = rng.choice([-1.0, 1.0])
    theta = start + direction * 2.0 * math.pi * _phase(num_frames)
    eye = np.stack(
        [
            _LOOP_RADIUS * half_x * np.cos(theta),
            _LOOP_RADIUS * half_y * np.sin(theta),
            1.5 + 0.15 * np.sin(2.0 * theta),
        ],
        axis=-1,
    )
    # The gaze wanders around the centre with the same period, so the loop still closes exactly.
    target = np.stack(
        [
            0.2 * half_x * np.cos(2.0 * theta + 1.0),
            0.2 * half_y * np.sin(3.0 * theta),
            0.9 + 0.2 * np.sin(theta),
        ],
        axis=-1,
    )
    return _finish(eye, target, height, width, fov_deg, device)


def back_and_forth_trajectory(
    scene: Scene, num_frames: int, height: int, width: int, *, fov_deg: float = 60.0, seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Walk along one side of the room (seeded choice of side) and return along the same path."""
    rng = np.random.default_rng([seed, 2])
    half_x, half_y, _ = _half_extents(scene)
    side = int(rng.integers(0, 4))  # which of the four sides the corridor runs along
    # s goes 0 -> 1 -> 0 with zero speed at the turn (cosine profile), so the path is smooth.
    s = 0.5 - 0.5 * np.cos(2.0 * math.pi * _phase(num_frames))
    walk = -1.0 + 2.0 * s  # -1 .. 1 along the corridor
    sign = -1.0 if side % 2 == 0 else 1.0
    if side < 2:  # corridor along y at x = +-0.6 half_x, looking towards -x / +x
        eye = np.stack([np.full_like(walk, sign * _LOOP_RADIUS * half_x), _LOOP_RADIUS * half_y * walk], -1)
        target = np.stack([np.full_like(walk, -sign * 0.3 * half_x), 0.5 * _LOOP_RADIUS * half_y * walk], -1)
    else:  # corridor along x at y = +-0.6 half_y
        eye = np.stack([_LOOP_RADIUS * half_x * walk, np.full_like(walk, sign * _LOOP_RADIUS * half_y)], -1)
        target = np.stack([0.5 * _LOOP_RADIUS * half_x * walk, np.full_like(walk, -sign * 0.3 * half_y)], -1)
    eye = np.concatenate([eye, np.full((num_frames, 1), 1.5)], axis=-1)
    target = np.concatenate([target, np.full((num_frames, 1), 0.9)], axis=-1)
    return _finish(eye, target, height, width, fov_deg, device)


def _smooth_signal(rng: np.random.Generator, t: np.ndarray, components: int = 3) -> np.ndarray:
    """Sum of random low-frequency sinusoids, normalised to [-1, 1]."""
    freqs = rng.uniform(0.3, 1.5, size=components)
    phases = rng.uniform(0.0, 2.0 * math.pi, size=components)
    amps = rng.uniform(0.5, 1.0, size=components)
    signal = (amps[:, None] * np.sin(2.0 * math.pi * freqs[:, None] * t[None] + phases[:, None])).sum(0)
    return signal / amps.sum()


def random_walk_trajectory(
    scene: Scene, num_frames: int, height: int, width: int, *, fov_deg: float = 60.0, seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random path in the free band around the centre, with a wandering gaze."""
    rng = np.random.default_rng([seed, 3])
    half_x, half_y, _ = _half_extents(scene)
    t = _phase(num_frames)
    # Angle around the room: a random drift of up to ~1.2 laps plus a wobble.
    theta = rng.uniform(0.0, 2.0 * math.pi) + rng.uniform(-1.2, 1.2) * 2.0 * math.pi * t
    theta = theta + 0.6 * _smooth_signal(rng, t)
    # Radius fraction between CAMERA_MIN_RADIUS (+margin) and CAMERA_MAX.
    low, high = CAMERA_MIN_RADIUS + 0.03, CAMERA_MAX
    radius = low + (high - low) * (0.5 + 0.5 * _smooth_signal(rng, t))
    eye = np.stack(
        [radius * half_x * np.cos(theta), radius * half_y * np.sin(theta), 1.5 + 0.25 * _smooth_signal(rng, t)], -1
    )
    target = np.stack(
        [
            0.3 * half_x * _smooth_signal(rng, t),
            0.3 * half_y * _smooth_signal(rng, t),
            0.9 + 0.3 * _smooth_signal(rng, t),
        ],
        -1,
    )
    return _finish(eye, target, height, width, fov_deg, device)


TrajectoryFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
TRAJECTORIES: dict[str, TrajectoryFn] = {
    "loop": loop_trajectory,
    "back_and_forth": back_and_forth_trajectory,
    "random_walk": random_walk_trajectory,
}


def make_trajectory(
    name: str, scene: Scene, num_frames: int, height: int, width: int, *, fov_deg: float = 60.0, seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Extrinsics ``[S, 3, 4]`` and intrinsics ``[S, 3, 3]`` of the named trajectory."""
    if name not in TRAJECTORIES:
        raise ValueError(f"unknown trajectory {name!r}; choose one of {sorted(TRAJECTORIES)}")
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    return TRAJECTORIES[name](scene, num_frames, height, width, fov_deg=fov_deg, seed=seed, device=device)
