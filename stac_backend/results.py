"""Writing results: a stream's reconstruction, and benchmark results with their run record.

A stream's per-frame arrays, merged point cloud and camera trajectory, written by the in-process
``stac stream`` and by the gRPC client alike, so both produce the same files:
- ``frames/frame_00000.npz``: depth, depth_conf, world_points, world_points_conf, pose_enc,
  extrinsics, intrinsics of one frame, the RGB image the model saw (``rgb``, uint8 [H, W, 3]),
  ``frame`` (its index) and ``source`` (where the stream came from);
- ``points.ply``: confidence-filtered world points of all frames (an absolute threshold, or by
  default the top half of each frame by confidence), coloured by the input pixels
  (binary little-endian PLY; at most ``max_points_per_frame`` per frame, chosen deterministically).
  The points are by default each frame's depth unprojected with its predicted camera (``points_from
  ="depth"``, VGGT's depth + camera branch, the more accurate of the model's two point estimates);
  ``points_from="head"`` takes the point head's map instead. The confidence is ``depth_conf`` by
  default: ``world_points_conf`` is nearly flat for the shipped small model, so a percentile of it
  keeps most pixels;
- ``trajectory.json``: per frame extrinsics (camera-from-world), intrinsics and camera centre, the
  source and its frame rate;
- ``trajectory_tum.txt``: the same poses as camera-to-world in TUM format (timestamp tx ty tz qx qy
  qz qw): the timestamp is in seconds (frame index / fps) when the source has a frame rate (videos),
  else the frame index (the file's header says which).

Units and frames of reference are the model's: world = the first frame's camera (OpenCV: x right,
y down, z forward), lengths up to one unknown scale per stream (VGGT normalises the scene).

A benchmark's result (``write_result``, ``write_text_result``) starts with its run record: the
benchmark's name, the command that reproduces it, the commit, the device and the date.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

FRAME_ARRAYS = ("depth", "depth_conf", "world_points", "world_points_conf", "pose_enc", "extrinsics", "intrinsics")
POINT_SOURCES = ("depth", "head")


def frame_world_points(arrays: Mapping[str, np.ndarray], points_from: str = "depth") -> Optional[np.ndarray]:
    """One frame's world points [H * W, 3] (float32, row-major pixels): ``"depth"`` unprojects its
    depth [H, W] (or [H, W, 1]) with its camera (extrinsics camera-from-world [3, 4], intrinsics
    [3, 3]; pixel (i, j) at u = j, v = i), ``"head"`` is the point head's ``world_points``. A frame
    without depth and cameras falls back to the point head's map; None when it has neither."""
    if points_from not in POINT_SOURCES:
        raise ValueError(f"points_from must be one of {POINT_SOURCES}, got {points_from!r}")
    if points_from == "depth" and all(k in arrays for k in ("depth", "extrinsics", "intrinsics")):
        depth = np.asarray(arrays["depth"], dtype=np.float64)
        depth = depth[..., 0] if depth.ndim == 3 else depth
        K, E = np.asarray(arrays["intrinsics"], np.float64), np.asarray(arrays["extrinsics"], np.float64)
        v, u = np.indices(depth.shape, dtype=np.float64)
        cam = np.stack([(u - K[0, 2]) / K[0, 0] * depth, (v - K[1, 2]) / K[1, 1] * depth, depth], axis=-1)
        world = (cam.reshape(-1, 3) - E[:3, 3]) @ E[:3, :3]  # x_world = R^T (x_cam - t)
        return world.astype(np.float32)
    if "world_points" in arrays:
        return np.asarray(arrays["world_points"]).reshape(-1, 3).astype(np.float32)
    return None


def confident_indices(points: np.ndarray, conf: np.ndarray, max_points: int, seed: int,
                      conf_threshold: Optional[float] = None, conf_percentile: float = 50.0) -> np.ndarray:
    """Indices of the finite points [N, 3] whose confidence [N] is at least ``conf_threshold`` (if
    given) or the frame's ``conf_percentile``-th percentile, at most ``max_points`` of them, drawn
    with ``seed`` and returned in order: what points.ply and the viewer keep of a frame."""
    finite = np.isfinite(points).all(axis=1) & np.isfinite(conf)
    if conf_threshold is not None:
        bar = conf_threshold
    else:
        bar = np.percentile(conf[finite], conf_percentile) if finite.any() else np.inf
    keep = np.flatnonzero(finite & (conf >= bar))
    if len(keep) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(keep, max_points, replace=False))
    return keep


def write_ply(path: Path, points: np.ndarray, colors: Optional[np.ndarray] = None) -> None:
    """Binary PLY of points [N, 3] (float32) with optional colours [N, 3] (uint8)."""
    points = np.ascontiguousarray(points, dtype="<f4").reshape(-1, 3)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if colors is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    rows = np.empty(len(points), dtype=fields)
    rows["x"], rows["y"], rows["z"] = points[:, 0], points[:, 1], points[:, 2]
    if colors is not None:
        colors = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
        rows["red"], rows["green"], rows["blue"] = colors[:, 0], colors[:, 1], colors[:, 2]
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(points)}"]
    header += [f"property float {n}" for n in "xyz"]
    if colors is not None:
        header += [f"property uchar {n}" for n in ("red", "green", "blue")]
    header.append("end_header")
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(rows.tobytes())


def read_ply_points(path: Path) -> np.ndarray:
    """Points [N, 3] of a PLY written by ``write_ply`` (for tests and tools)."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    count = int(next(line for line in header if line.startswith("element vertex")).split()[-1])
    has_color = any("red" in line for line in header)
    dtype = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")] + ([("r", "u1"), ("g", "u1"), ("b", "u1")] if has_color else [])
    rows = np.frombuffer(data[end:], dtype=dtype, count=count)
    return np.stack([rows["x"], rows["y"], rows["z"]], axis=1)


class ReconstructionWriter:
    """Collects a stream's per-frame outputs and writes them under one folder."""

    def __init__(self, out_dir: Path, conf_threshold: Optional[float] = None, max_points_per_frame: int = 20000,
                 save_frames: bool = True, conf_percentile: float = 50.0, conf_key: str = "depth_conf",
                 source: str = "", fps: Optional[float] = None, points_from: str = "depth"):
        """Points are kept where ``conf_key`` exceeds ``conf_threshold`` if given, else where it is
        at least the frame's ``conf_percentile``-th percentile (VGGT's demo keeps the top half);
        ``points_from``: "depth" (depth + cameras) or "head" (the point head), see ``frame_world_points``."""
        if conf_key not in ("depth_conf", "world_points_conf"):
            raise ValueError(f"conf_key must be depth_conf or world_points_conf, got {conf_key!r}")
        if points_from not in POINT_SOURCES:
            raise ValueError(f"points_from must be one of {POINT_SOURCES}, got {points_from!r}")
        self.points_from = points_from
        self.out_dir = Path(out_dir)
        self.conf_key = conf_key
        self.source = source
        self.fps = fps
        self.conf_threshold = conf_threshold
        self.conf_percentile = conf_percentile
        self.max_points_per_frame = max_points_per_frame
        self.save_frames = save_frames
        self.points: list[np.ndarray] = []
        self.colors: list[np.ndarray] = []
        self.poses: list[dict] = []
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if save_frames:
            (self.out_dir / "frames").mkdir(exist_ok=True)

    def add(self, frame_index: int, outputs: Mapping[str, np.ndarray], image: Optional[np.ndarray] = None) -> None:
        """outputs: one frame's arrays (no frame dimension); image: [3, H, W] float in [0, 1] or uint8."""
        arrays = {k: _numpy(outputs[k]) for k in FRAME_ARRAYS if k in outputs}
        rgb = None
        if image is not None:
            rgb = _numpy(image)
            rgb = rgb if rgb.dtype == np.uint8 else (np.clip(rgb, 0, 1) * 255.0 + 0.5).astype(np.uint8)
        if self.save_frames:
            extra = {"frame": np.int64(frame_index), "source": np.str_(self.source)}
            if rgb is not None:
                extra["rgb"] = np.ascontiguousarray(rgb.transpose(1, 2, 0))
            np.savez_compressed(self.out_dir / "frames" / f"frame_{frame_index:05d}.npz", **arrays, **extra)
        pts = frame_world_points(arrays, self.points_from)
        if pts is not None:
            conf_key = self.conf_key if self.conf_key in arrays else "world_points_conf"
            conf = arrays[conf_key].reshape(-1).astype(np.float32)
            keep = confident_indices(pts, conf, self.max_points_per_frame, frame_index, self.conf_threshold,
                                     self.conf_percentile)
            self.points.append(pts[keep])
            if rgb is not None:
                self.colors.append(rgb.reshape(3, -1).T[keep])
        if "extrinsics" in arrays:
            extr = arrays["extrinsics"].astype(np.float64)
            R, t = extr[:3, :3], extr[:3, 3]
            self.poses.append(
                {
                    "frame": int(frame_index),
                    "extrinsics": extr.tolist(),
                    "intrinsics": arrays["intrinsics"].astype(np.float64).tolist(),
                    "center": (-R.T @ t).tolist(),
                }
            )

    @property
    def num_points(self) -> int:
        return int(sum(len(p) for p in self.points))

    def finish(self) -> dict:
        """Write the point cloud and trajectory; returns a summary."""
        points = np.concatenate(self.points) if self.points else np.zeros((0, 3), np.float32)
        colors = np.concatenate(self.colors) if self.colors and len(self.colors) == len(self.points) else None
        write_ply(self.out_dir / "points.ply", points, colors)
        (self.out_dir / "trajectory.json").write_text(json.dumps(
            {"source": self.source, "fps": self.fps, "frames": self.poses}, indent=1))
        with open(self.out_dir / "trajectory_tum.txt", "w") as f:
            clock = f"seconds (frame / {self.fps:g} fps)" if self.fps else "frame index (the source has no frame rate)"
            f.write(f"# timestamp tx ty tz qx qy qz qw (camera-to-world); timestamp = {clock}\n")
            for pose in self.poses:
                extr = np.asarray(pose["extrinsics"])
                q = rotation_to_quaternion(extr[:3, :3].T)
                c = pose["center"]
                stamp = f"{pose['frame'] / self.fps:.6f}" if self.fps else str(pose["frame"])
                f.write(f"{stamp} {c[0]:.6f} {c[1]:.6f} {c[2]:.6f} {q[0]:.6f} {q[1]:.6f} {q[2]:.6f} {q[3]:.6f}\n")
        return {"frames": len(self.poses), "points": int(len(points)), "out_dir": str(self.out_dir)}


def rotation_to_quaternion(R: np.ndarray) -> np.ndarray:
    """A rotation matrix [3, 3] as a unit quaternion (x, y, z, w) with w >= 0 (TUM's order)."""
    R = np.asarray(R, dtype=np.float64)
    t = np.trace(R)
    candidates = np.array([1 + 2 * R[0, 0] - t, 1 + 2 * R[1, 1] - t, 1 + 2 * R[2, 2] - t, 1 + t])
    k = int(np.argmax(candidates))  # the largest component first: numerically stable (Shepperd)
    big = np.sqrt(max(candidates[k], 0.0)) / 2
    if k == 3:
        q = [(R[2, 1] - R[1, 2]) / (4 * big), (R[0, 2] - R[2, 0]) / (4 * big), (R[1, 0] - R[0, 1]) / (4 * big), big]
    elif k == 0:
        q = [big, (R[0, 1] + R[1, 0]) / (4 * big), (R[0, 2] + R[2, 0]) / (4 * big), (R[2, 1] - R[1, 2]) / (4 * big)]
    elif k == 1:
        q = [(R[0, 1] + R[1, 0]) / (4 * big), big, (R[1, 2] + R[2, 1]) / (4 * big), (R[0, 2] - R[2, 0]) / (4 * big)]
    else:
        q = [(R[0, 2] + R[2, 0]) / (4 * big), (R[1, 2] + R[2, 1]) / (4 * big), big, (R[1, 0] - R[0, 1]) / (4 * big)]
    q = np.asarray(q)
    q /= np.linalg.norm(q)
    return -q if q[3] < 0 else q


def _numpy(x) -> np.ndarray:
    """numpy from numpy or a torch tensor (read without importing torch; half floats widened)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


# Benchmark results -------------------------------------------------------------------------------
# Every file a benchmark writes under docs/benchmarks/ starts with a "run" record, so a reader (and
# benchmarks/report.py, which finds files by it) knows what was measured, how to measure it again,
# on which code and machine, and when.


def run_record(benchmark: str, device: Optional[str] = None, argv: Optional[list[str]] = None) -> dict:
    """{"benchmark", "command", "commit", "device", "date"} of the running benchmark.

    ``device``: "cpu", "cuda[:N]" or None (the first GPU if there is one, else the CPU); a GPU is
    recorded by its name ("NVIDIA H100 80GB HBM3"). ``commit`` ends in "-dirty" when tracked files
    differ from it, and is None outside a git checkout.
    """
    import datetime

    return {
        "benchmark": benchmark,
        "command": command_line(argv),
        "commit": git_commit(),
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def command_line(argv: Optional[list[str]] = None) -> str:
    """The command as typed from the checkout's root: ``python benchmarks/x.py --flag value``."""
    import shlex
    import sys

    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]) if argv else Path("python")
    try:
        script = script.resolve().relative_to(_checkout_root())
    except ValueError:
        pass
    return shlex.join(["python", str(script), *argv[1:]])


def git_commit() -> Optional[str]:
    import subprocess

    root = _checkout_root()
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "") if sha else None


def device_name(device: Optional[str] = None) -> str:
    import torch  # benchmarks have it; the client's use of this module (reconstructions) does not need it

    if device is None or str(device).startswith("cuda"):
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.device(device or "cuda"))
        if device is not None:
            return str(device)
    return "cpu"


def device_key(name: str) -> str:
    """The short device name used in result file names: "h100", "h200", "a100", "cpu"."""
    import re

    found = re.search(r"\b([A-Z]{1,3})[ -]?(\d{2,4}[A-Z]?)\b", name or "")
    if found:
        return (found.group(1) + found.group(2)).lower()
    return "cpu" if not name or name.lower().startswith("cpu") else re.sub(r"[^a-z0-9]+", "", name.lower()) or "gpu"


def write_result(path: Path, data: dict, benchmark: str, device: Optional[str] = None) -> Path:
    """Write a benchmark's JSON with its run record first (kept when ``data`` already has one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = data.get("run") or run_record(benchmark, device)
    path.write_text(json.dumps({"run": record, **{k: v for k, v in data.items() if k != "run"}}, indent=1, default=float))
    return path


def write_text_result(path: Path, text: str, benchmark: str, device: Optional[str] = None) -> Path:
    """Write a text result (a profile, a test log) under a header of "# key: value" run lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "".join(f"# {k}: {v}\n" for k, v in run_record(benchmark, device).items())
    path.write_text(header + "\n" + text)
    return path


def read_text_run(path: Path) -> dict:
    """The run record of a text result written by ``write_text_result`` (empty when it has none)."""
    record = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        if not line.startswith("# ") or ": " not in line:
            break
        key, value = line[2:].split(": ", 1)
        record[key] = value
    return record


def _checkout_root() -> Path:
    return Path(__file__).resolve().parents[1]
