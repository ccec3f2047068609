"""A stream's output folder as plain arrays: the coloured point cloud, the cameras, per-frame depth.

Reads what ``stac_backend.results.ReconstructionWriter`` writes (points.ply, trajectory.json,
frames/frame_*.npz). Cameras follow the model's conventions: extrinsics are OpenCV
camera-from-world [3, 4] (x right, y down, z forward), world = the first frame's camera.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np


@dataclass
class Camera:
    frame: int
    extrinsics: np.ndarray  # [3, 4] camera-from-world
    intrinsics: np.ndarray  # [3, 3], in pixels of the image the model saw
    width: int = 0
    height: int = 0

    @property
    def center(self) -> np.ndarray:
        R, t = self.extrinsics[:3, :3], self.extrinsics[:3, 3]
        return -R.T @ t

    @property
    def cam_to_world(self) -> np.ndarray:
        """[4, 4] world-from-camera."""
        out = np.eye(4)
        out[:3, :3] = self.extrinsics[:3, :3].T
        out[:3, 3] = self.center
        return out


@dataclass
class Scene:
    folder: Path
    points: np.ndarray  # [N, 3] float32
    colors: np.ndarray  # [N, 3] uint8
    cameras: list[Camera] = field(default_factory=list)
    frame_files: list[Path] = field(default_factory=list)

    def frame(self, k: int) -> dict[str, np.ndarray]:
        """The arrays of the k-th saved frame (depth, depth_conf, rgb, ...)."""
        with np.load(self.frame_files[k]) as data:
            return {name: data[name] for name in data.files}

    @property
    def extent(self) -> float:
        """A length that spans the scene (for frustum sizes and view distances)."""
        pts = self.points if len(self.points) else np.array([c.center for c in self.cameras] or [[0, 0, 0]], float)
        lo, hi = np.percentile(pts, 5, axis=0), np.percentile(pts, 95, axis=0)
        return float(max(np.linalg.norm(hi - lo), 1e-3))


def read_ply(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Points [N, 3] and colours [N, 3] (grey when the file has none) of a binary PLY from
    ``results.write_ply``."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    count = int(next(line for line in header if line.startswith("element vertex")).split()[-1])
    has_color = any(line.endswith(" red") for line in header)
    dtype = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")] + ([("r", "u1"), ("g", "u1"), ("b", "u1")] if has_color else [])
    rows = np.frombuffer(data[end:], dtype=dtype, count=count)
    points = np.stack([rows["x"], rows["y"], rows["z"]], axis=1).astype(np.float32)
    colors = np.stack([rows["r"], rows["g"], rows["b"]], axis=1) if has_color else np.full((count, 3), 160, np.uint8)
    return points, colors


def load_scene(folder) -> Scene:
    folder = Path(folder)
    if not (folder / "trajectory.json").is_file():
        raise FileNotFoundError(f"{folder} holds no trajectory.json: not an output folder of stac stream / stac demo")
    points, colors = read_ply(folder / "points.ply") if (folder / "points.ply").is_file() else (
        np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8))
    frame_files = sorted((folder / "frames").glob("frame_*.npz"))
    size = _image_size(frame_files[0]) if frame_files else (0, 0)
    cameras = [Camera(int(p["frame"]), np.asarray(p["extrinsics"], float), np.asarray(p["intrinsics"], float), *size)
               for p in json.loads((folder / "trajectory.json").read_text())["frames"]]
    return Scene(folder, points, colors, cameras, frame_files)


def _image_size(npz: Path) -> tuple[int, int]:
    with np.load(npz) as data:
        if "depth" in data.files:
            h, w = data["depth"].shape[-2:]
            return int(w), int(h)
    return 0, 0


def frustum_segments(camera: Camera, scale: float) -> np.ndarray:
    """The camera's frustum as line segments [8, 2, 3] in world coordinates (apex to the four
    corners of an image plane at depth ``scale``, and that plane's rectangle)."""
    K = camera.intrinsics
    w = camera.width or 2 * K[0, 2]
    h = camera.height or 2 * K[1, 2]
    corners_px = np.array([[0, 0], [w, 0], [w, h], [0, h]], float)
    rays = np.stack([(corners_px[:, 0] - K[0, 2]) / K[0, 0], (corners_px[:, 1] - K[1, 2]) / K[1, 1], np.ones(4)], 1)
    pose = camera.cam_to_world
    corners = (rays * scale) @ pose[:3, :3].T + pose[:3, 3]
    apex = pose[:3, 3]
    segments = [(apex, c) for c in corners] + [(corners[i], corners[(i + 1) % 4]) for i in range(4)]
    return np.asarray(segments)


def colorize(values: np.ndarray, lo: Optional[float] = None, hi: Optional[float] = None) -> np.ndarray:
    """A scalar image [H, W] as RGB uint8 (dark blue -> yellow, perceptually ordered; non-finite
    values black). ``lo``/``hi`` default to the 2nd and 98th percentiles."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    if lo is None or hi is None:
        sample = values[finite] if finite.any() else np.zeros(1)
        lo = np.percentile(sample, 2) if lo is None else lo
        hi = np.percentile(sample, 98) if hi is None else hi
    t = np.clip((values - lo) / max(hi - lo, 1e-12), 0, 1)
    t = np.where(finite, t, 0)
    # a viridis-like ramp through five anchors
    anchors = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)
    pos = t * (len(anchors) - 1)
    i = np.clip(pos.astype(int), 0, len(anchors) - 2)
    f = (pos - i)[..., None]
    rgb = anchors[i] * (1 - f) + anchors[i + 1] * f
    rgb[~finite] = 0
    return rgb.round().astype(np.uint8)
