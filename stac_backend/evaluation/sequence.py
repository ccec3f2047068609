"""``EvalSequence``: frames at the model's input size with whatever ground truth a dataset has.

Every loader turns its files into frames of ``FrameRecord`` (an RGB image, optional metric depth,
optional camera-to-world pose, optional intrinsics at the image's own resolution) and
``build_sequence`` brings them to the size the model sees, exactly as ``stac stream`` does (VGGT's
``crop`` / ``pad`` preprocessing), moving the ground truth along: depth is resized with nearest
neighbours (so holes stay holes and no depth is invented across edges), intrinsics are scaled and
shifted by the same resize and crop / pad. Conventions are those of ``stac_backend.data``: metres,
z-depth, OpenCV camera-from-world extrinsics, pixel ``(i, j)`` at image coordinate ``(j, i)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..data.camera import invert_extrinsics, to_homogeneous, unproject_depth
from ..model.preprocess import preprocess_image, target_size

__all__ = ["FrameRecord", "EvalSequence", "build_sequence", "fit_intrinsics", "fit_depth"]


@dataclass
class FrameRecord:
    """One frame as a dataset stores it (before resizing).

    ``depth`` is metric z-depth in metres at the depth image's resolution, 0 (or non-finite) where
    invalid; ``camera_to_world`` is a 4x4 pose; ``intrinsics`` a 3x3 matrix for the depth image's
    resolution (which the loader makes the colour image's too).
    """

    image: Path
    name: str
    depth: Optional[Path] = None
    camera_to_world: Optional[np.ndarray] = None
    intrinsics: Optional[np.ndarray] = None


@dataclass
class EvalSequence:
    """Frames at the model's size and their ground truth, any part of which may be missing.

    ``images`` ``[S, 3, H, W]`` uint8; ``depth`` ``[S, H, W]`` metres (0 where invalid); ``valid``
    ``[S, H, W]``; ``extrinsics`` ``[S, 3, 4]`` camera-from-world expressed in the first frame's
    camera (VGGT's world frame); ``intrinsics`` ``[S, 3, 3]``; ``world_points`` ``[S, H, W, 3]``
    from depth, intrinsics and poses where all three exist.
    """

    name: str
    images: torch.Tensor
    frame_names: list[str]
    depth: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None
    extrinsics: Optional[torch.Tensor] = None
    intrinsics: Optional[torch.Tensor] = None
    world_points: Optional[torch.Tensor] = None
    metadata: dict = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.images.shape[0])

    def ground_truth(self) -> dict[str, torch.Tensor]:
        """The fields ``stac_backend.metrics.evaluate_sequence`` reads, those that exist."""
        fields = {"depth": self.depth, "valid": self.valid, "extrinsics": self.extrinsics, "world_points": self.world_points}
        return {k: v for k, v in fields.items() if v is not None}


def _crop_or_pad_offsets(new_w: int, new_h: int, mode: str, target: int) -> tuple[int, int, int, int]:
    """(left, top, out_w, out_h): where the resized image lands in the model's frame.

    Negative offsets crop (``crop`` mode, too tall), positive ones pad (``pad`` mode); the same
    arithmetic as ``stac_backend.model.preprocess.preprocess_image``.
    """
    if mode == "crop":
        if new_h > target:
            return 0, -((new_h - target) // 2), new_w, target
        return 0, 0, new_w, new_h
    return (target - new_w) // 2, (target - new_h) // 2, target, target


def fit_intrinsics(intrinsics: np.ndarray, width: int, height: int, mode: str, target: int, patch_size: int = 14) -> np.ndarray:
    """Intrinsics of an image of ``width x height`` after the model's resize and crop / pad.

    With pixel centres at integer coordinates, a resize by ``s`` maps ``u`` to ``(u + 0.5) s - 0.5``.
    """
    new_w, new_h = target_size(width, height, mode, target, patch_size)
    left, top, _, _ = _crop_or_pad_offsets(new_w, new_h, mode, target)
    sx, sy = new_w / width, new_h / height
    k = np.array(intrinsics, dtype=np.float64).copy()
    k[0, 0], k[0, 1], k[1, 1] = k[0, 0] * sx, k[0, 1] * sx, k[1, 1] * sy
    k[0, 2] = (k[0, 2] + 0.5) * sx - 0.5 + left
    k[1, 2] = (k[1, 2] + 0.5) * sy - 0.5 + top
    return k


def fit_depth(depth: np.ndarray, width: int, height: int, mode: str, target: int, patch_size: int = 14) -> np.ndarray:
    """Depth ``[h, w]`` (metres) brought onto the model's frame of an image of ``width x height``.

    The depth map may have another resolution than the image (it is first resized to the image's
    resolution); nearest-neighbour resizing keeps invalid pixels invalid; padding is invalid (0).
    """
    depth = np.where(np.isfinite(depth), depth, 0.0).astype(np.float32)
    new_w, new_h = target_size(width, height, mode, target, patch_size)
    resized = np.asarray(Image.fromarray(depth, mode="F").resize((new_w, new_h), Image.Resampling.NEAREST))
    left, top, out_w, out_h = _crop_or_pad_offsets(new_w, new_h, mode, target)
    out = np.zeros((out_h, out_w), dtype=np.float32)
    src_top, dst_top = max(0, -top), max(0, top)
    rows = min(new_h - src_top, out_h - dst_top)
    out[dst_top : dst_top + rows, left : left + new_w] = resized[src_top : src_top + rows]
    return out


def _read_depth(path: Path, scale: float, invalid: Optional[int]) -> np.ndarray:
    """Metric depth from a 16-bit PNG (value / scale) or a float ``.npy`` in metres."""
    if path.suffix.lower() == ".npy":
        return np.load(path).astype(np.float32)
    with Image.open(path) as img:
        raw = np.asarray(img)
    if raw.ndim != 2:
        raise ValueError(f"{path}: a depth image must have one channel, got shape {raw.shape}")
    raw = raw.astype(np.float64)
    depth = raw / scale
    if invalid is not None:
        depth[raw == invalid] = 0.0
    return depth.astype(np.float32)


def build_sequence(
    name: str,
    records: Sequence[FrameRecord],
    *,
    target: int,
    mode: str = "crop",
    patch_size: int = 14,
    depth_scale: float = 1000.0,
    depth_invalid: Optional[int] = None,
    max_depth: Optional[float] = None,
    image_size: Optional[tuple[int, int]] = None,
    metadata: Optional[dict] = None,
) -> EvalSequence:
    """Load, resize and stack ``records`` into an ``EvalSequence``.

    ``depth_scale``: PNG value per metre (TUM 5000, millimetres 1000); ``depth_invalid``: a raw
    value meaning "no depth" besides 0 (7-Scenes: 65535); ``max_depth`` drops farther GT pixels;
    ``image_size`` ``(w, h)`` resizes colour images first (ScanNet: colour to the depth camera's
    size, whose intrinsics the geometry uses). Ground truth is kept only where every frame has it.
    """
    if not records:
        raise ValueError(f"{name}: no frames to evaluate")
    images, depths, poses, intrinsics = [], [], [], []
    for record in records:
        with Image.open(record.image) as img:
            img = img.convert("RGB")
            if image_size is not None and img.size != tuple(image_size):
                img = img.resize(tuple(image_size), Image.Resampling.BICUBIC)
            width, height = img.size
            frame = preprocess_image(img, mode, target, patch_size)
        images.append((frame * 255.0).round().to(torch.uint8))
        if record.depth is not None:
            depth = _read_depth(record.depth, depth_scale, depth_invalid)
            if max_depth is not None:
                depth[depth > max_depth] = 0.0
            depths.append(fit_depth(depth, width, height, mode, target, patch_size))
        if record.intrinsics is not None:
            intrinsics.append(fit_intrinsics(record.intrinsics, width, height, mode, target, patch_size))
        if record.camera_to_world is not None:
            poses.append(np.asarray(record.camera_to_world, dtype=np.float64))
    shapes = {tuple(f.shape) for f in images}
    if len(shapes) > 1:
        raise ValueError(f"{name}: frames preprocess to different sizes {sorted(shapes)}; use --mode pad")
    seq = EvalSequence(name=name, images=torch.stack(images), frame_names=[r.name for r in records],
                       metadata=dict(metadata or {}))
    count = len(records)
    if len(depths) == count:
        seq.depth = torch.from_numpy(np.stack(depths))
        seq.valid = seq.depth > 0
    if len(poses) == count:
        seq.extrinsics = _first_camera_extrinsics(np.stack(poses))
    if len(intrinsics) == count:
        seq.intrinsics = torch.from_numpy(np.stack(intrinsics)).float()
    if seq.depth is not None and seq.extrinsics is not None and seq.intrinsics is not None:
        points = unproject_depth(seq.depth, seq.extrinsics, seq.intrinsics)
        seq.world_points = torch.where(seq.valid.unsqueeze(-1), points, torch.zeros_like(points))
    seq.metadata.update(frames=count, image_hw=list(seq.images.shape[-2:]),
                        ground_truth=sorted(k for k in seq.ground_truth() if k != "valid"))
    return seq


def _first_camera_extrinsics(camera_to_world: np.ndarray) -> torch.Tensor:
    """Camera-from-world ``[S, 3, 4]`` re-expressed with frame 0 as the world (VGGT's convention)."""
    poses = torch.from_numpy(camera_to_world)  # [S, 4, 4] float64
    # camera_i-from-new-world = camera_i-from-world @ world-from-camera_0 = inverse(pose_i) @ pose_0.
    extrinsics = to_homogeneous(invert_extrinsics(poses[:, :3, :4])) @ poses[0]
    return extrinsics[:, :3, :4].float()
