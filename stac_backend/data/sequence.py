"""``SyntheticSequence``: a rendered camera stream with full ground truth.

World frames: ``make_sequence`` returns data in the scene frame (metres, z up, floor at z = 0) by
default; ``to_first_camera_frame`` re-expresses everything in camera 0's OpenCV frame, which is the
world frame VGGT predicts in (frame 0 has identity extrinsics).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .camera import camera_centers, invert_extrinsics, to_homogeneous
from .render import DEFAULT_CHUNK_RAYS, render_frames
from .scene import make_scene
from .trajectory import make_trajectory

__all__ = ["SyntheticSequence", "make_sequence", "to_first_camera_frame", "WORLD_FRAMES"]

WORLD_FRAMES = ("scene", "first_camera")


@dataclass
class SyntheticSequence:
    """A stream of ``S`` rendered frames and their ground truth (all tensors on one device).

    Attributes:
        images: ``[S, 3, H, W]`` float32 RGB in [0, 1].
        depth: ``[S, H, W]`` float32 z-depth in metres (0 where invalid).
        valid: ``[S, H, W]`` bool; True where depth / world points are defined.
        world_points: ``[S, H, W, 3]`` float32 world coordinates in metres (0 where invalid).
        extrinsics: ``[S, 3, 4]`` float32 OpenCV camera-from-world.
        intrinsics: ``[S, 3, 3]`` float32 pinhole intrinsics (pixel (i, j) at (u, v) = (j, i)).
        metadata: JSON-serialisable dict: seed, trajectory, fov, world frame, scene description...
    """

    images: torch.Tensor
    depth: torch.Tensor
    valid: torch.Tensor
    world_points: torch.Tensor
    extrinsics: torch.Tensor
    intrinsics: torch.Tensor
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be [S, 3, H, W], got {tuple(self.images.shape)}")
        s, _, h, w = self.images.shape
        expected = {
            "depth": (s, h, w),
            "valid": (s, h, w),
            "world_points": (s, h, w, 3),
            "extrinsics": (s, 3, 4),
            "intrinsics": (s, 3, 3),
        }
        for name, shape in expected.items():
            actual = tuple(getattr(self, name).shape)
            if actual != shape:
                raise ValueError(f"{name} must have shape {shape}, got {actual}")

    @property
    def num_frames(self) -> int:
        return int(self.images.shape[0])

    @property
    def height(self) -> int:
        return int(self.images.shape[2])

    @property
    def width(self) -> int:
        return int(self.images.shape[3])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def camera_centers(self) -> torch.Tensor:
        """Camera centres ``[S, 3]`` in the sequence's world frame."""
        return camera_centers(self.extrinsics)

    def to(self, device: torch.device | str) -> "SyntheticSequence":
        """Copy with every tensor on ``device``."""
        return SyntheticSequence(
            images=self.images.to(device),
            depth=self.depth.to(device),
            valid=self.valid.to(device),
            world_points=self.world_points.to(device),
            extrinsics=self.extrinsics.to(device),
            intrinsics=self.intrinsics.to(device),
            metadata=copy.deepcopy(self.metadata),
        )

    def subset(self, frames: slice | list[int] | torch.Tensor) -> "SyntheticSequence":
        """The given frames (e.g. ``seq.subset(slice(0, 8))``), metadata unchanged."""
        index = frames if isinstance(frames, slice) else torch.as_tensor(frames, dtype=torch.long)
        return SyntheticSequence(
            images=self.images[index],
            depth=self.depth[index],
            valid=self.valid[index],
            world_points=self.world_points[index],
            extrinsics=self.extrinsics[index],
            intrinsics=self.intrinsics[index],
            metadata=copy.deepcopy(self.metadata),
        )


def to_first_camera_frame(seq: SyntheticSequence) -> SyntheticSequence:
    """Re-express ``seq`` in the OpenCV frame of its first camera (VGGT's world frame).

    Afterwards ``extrinsics[0]`` is ``[I | 0]``, world points are in camera 0's coordinates (x right,
    y down, z forward, metres), and depth, images and intrinsics are unchanged. The 4x4 transform
    that maps scene-frame points into the new world frame is kept in ``metadata["world_from_scene"]``
    (composed with any earlier change); applying the function twice changes nothing the second time.
    """
    # new_world_from_old_world = camera-0-from-old-world.
    transform = to_homogeneous(seq.extrinsics[0:1].to(torch.float64))[0]
    rotation, translation = transform[:3, :3], transform[:3, 3]
    # camera_i-from-new-world = camera_i-from-old-world @ old-world-from-new-world.
    old_from_new = to_homogeneous(invert_extrinsics(transform[None, :3, :]))[0]
    extrinsics = (to_homogeneous(seq.extrinsics.to(torch.float64)) @ old_from_new)[:, :3, :]
    points = seq.world_points.to(torch.float64) @ rotation.T + translation
    points = torch.where(seq.valid.unsqueeze(-1), points, torch.zeros_like(points))
    metadata = copy.deepcopy(seq.metadata)
    previous = torch.tensor(metadata.get("world_from_scene", torch.eye(4).tolist()), dtype=torch.float64)
    metadata["world_from_scene"] = (transform.cpu() @ previous).tolist()
    metadata["world_frame"] = "first_camera"
    return SyntheticSequence(
        images=seq.images,
        depth=seq.depth,
        valid=seq.valid,
        world_points=points.to(seq.world_points.dtype),
        extrinsics=extrinsics.to(seq.extrinsics.dtype),
        intrinsics=seq.intrinsics,
        metadata=metadata,
    )


def make_sequence(
    num_frames: int,
    height: int,
    width: int,
    trajectory: str = "loop",
    seed: int = 0,
    device: torch.device | str = "cpu",
    *,
    fov_deg: float = 60.0,
    world_frame: str = "scene",
    max_depth: float | None = None,
    chunk_rays: int = DEFAULT_CHUNK_RAYS,
) -> SyntheticSequence:
    """Render a synthetic indoor stream with ground truth, deterministically from ``seed``.

    Args:
        num_frames, height, width: sequence length and image size in pixels.
        trajectory: "loop", "back_and_forth" or "random_walk" (see ``trajectory.py``).
        seed: drives the scene layout, textures and the trajectory's random choices.
        device: where to render and keep the tensors ("cpu", "cuda", ...).
        fov_deg: horizontal field of view in degrees (square pixels).
        world_frame: "scene" (metres, z up, floor z = 0) or "first_camera" (VGGT's convention).
        max_depth: optional sensor range in metres; farther pixels are marked invalid.
        chunk_rays: rays per rendering chunk (bounds peak memory).
    """
    if num_frames <= 0 or height <= 0 or width <= 0:
        raise ValueError(f"num_frames, height and width must be positive, got {num_frames}, {height}, {width}")
    if world_frame not in WORLD_FRAMES:
        raise ValueError(f"world_frame must be one of {WORLD_FRAMES}, got {world_frame!r}")
    scene = make_scene(seed, device=device)
    extrinsics, intrinsics = make_trajectory(
        trajectory, scene, num_frames, height, width, fov_deg=fov_deg, seed=seed, device=device
    )
    rendered = render_frames(scene, extrinsics, intrinsics, height, width, chunk_rays=chunk_rays, max_depth=max_depth)
    metadata = {
        "generator": "stac_backend.data.synthetic",
        "format_version": 1,
        "seed": seed,
        "trajectory": trajectory,
        "fov_deg": fov_deg,
        "max_depth": max_depth,
        "world_frame": "scene",
        "world_from_scene": torch.eye(4, dtype=torch.float64).tolist(),
        "units": "metres",
        "depth": "z-depth along the optical axis",
        "extrinsics": "OpenCV camera-from-world [R|t], x right, y down, z forward",
        "intrinsics": "principal point (W/2, H/2), f = (W/2)/tan(fov_x/2), pixel (i, j) at (u, v) = (j, i)",
        "scene": scene.describe(),
    }
    seq = SyntheticSequence(
        images=rendered.images,
        depth=rendered.depth,
        valid=rendered.valid,
        world_points=rendered.world_points,
        extrinsics=extrinsics,
        intrinsics=intrinsics,
        metadata=metadata,
    )
    return to_first_camera_frame(seq) if world_frame == "first_camera" else seq
