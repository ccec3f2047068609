"""Loaders for the formats the field's benchmarks ship in, each to ``FrameRecord`` lists.

* ``tum``: TUM RGB-D (``rgb.txt``, ``depth.txt``, ``groundtruth.txt``; 16-bit depth PNGs, 5000 per
  metre; poses ``timestamp tx ty tz qx qy qz qw`` camera-to-world). Colour, depth and pose streams
  are associated by timestamp as TUM's ``associate.py`` does: closest pairs first, each entry used
  once, at most 0.02 s apart.
* ``7scenes``: Microsoft 7-Scenes (``seq-XX/frame-XXXXXX.color.png``, ``.depth.png`` in millimetres
  with 65535 = no depth, ``.pose.txt`` 4x4 camera-to-world). A scene folder holds several
  ``seq-XX`` sequences; intrinsics are the dataset's published depth-camera values.
* ``scannet``: ScanNet-style exported folders (``color/N.jpg``, ``depth/N.png`` in millimetres,
  ``pose/N.txt`` 4x4 camera-to-world, ``intrinsic/intrinsic_depth.txt``). The geometry is the
  depth camera's, so colour images are resized to the depth images' size; frames whose pose is
  not finite (lost tracking) are skipped.
* ``folder``: images in ``FOLDER`` or ``FOLDER/images``, with optional ``depth/<stem>.png|.npy``,
  ``poses/<stem>.txt`` (4x4 camera-to-world) and ``intrinsics.txt`` (3x3, or ``fx fy cx cy``).
* ``synthetic``: a folder written by ``stac synth`` (``ground_truth.npz`` + PNG frames).

Subsampling (``stride``, ``start``, ``max_frames``) applies to the associated frame list, before
any image is read, as the papers subsample (e.g. every 20th 7-Scenes frame, the first 90 TUM ones).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

from ..model.preprocess import IMAGE_SUFFIXES
from .sequence import EvalSequence, FrameRecord, build_sequence

__all__ = ["FORMATS", "LoadOptions", "detect_format", "load_sequences", "associate", "read_tum_list",
           "quaternion_to_rotation", "TUM_INTRINSICS", "SEVEN_SCENES_INTRINSICS"]

# Published colour-camera intrinsics of TUM RGB-D (fx, fy, cx, cy), by sensor; "default" is the ROS
# default TUM recommends where undistortion is not applied.
TUM_INTRINSICS = {
    "freiburg1": (517.3, 516.5, 318.6, 255.3),
    "freiburg2": (520.9, 521.0, 325.1, 249.7),
    "freiburg3": (535.4, 539.2, 320.1, 247.6),
    "default": (525.0, 525.0, 319.5, 239.5),
}
SEVEN_SCENES_INTRINSICS = (585.0, 585.0, 320.0, 240.0)  # depth camera, as the dataset documents
TUM_DEPTH_SCALE = 5000.0
MILLIMETRES = 1000.0
SEVEN_SCENES_INVALID = 65535
TUM_MAX_DIFFERENCE = 0.02  # seconds


@dataclass
class LoadOptions:
    """How to load: the model's input size and preprocessing, subsampling, and overrides."""

    target: int = 518
    mode: str = "crop"
    patch_size: int = 14
    stride: int = 1
    start: int = 0
    max_frames: Optional[int] = None
    sequences: Optional[list[str]] = None  # names of sub-sequences to keep (e.g. seq-01)
    intrinsics: Optional[tuple[float, float, float, float]] = None  # fx fy cx cy at the files' resolution
    depth_scale: Optional[float] = None  # PNG value per metre (default: the format's)
    max_depth: Optional[float] = None

    def __post_init__(self) -> None:
        if self.stride < 1 or self.start < 0 or (self.max_frames is not None and self.max_frames < 1):
            raise ValueError(f"stride must be >= 1, start >= 0 and max_frames >= 1, got {self.stride}, {self.start}, "
                             f"{self.max_frames}")

    def pick(self, items: list) -> list:
        return items[self.start :: self.stride][: self.max_frames]

    def build(self, name: str, records: list[FrameRecord], **kwargs) -> EvalSequence:
        return build_sequence(name, self.pick(records), target=self.target, mode=self.mode, patch_size=self.patch_size,
                              max_depth=self.max_depth, **kwargs)


def _matrix(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def quaternion_to_rotation(qx: float, qy: float, qz: float, qw: float) -> np.ndarray:
    """Rotation matrix of a (normalised here) quaternion in TUM's x y z w order."""
    q = np.array([qx, qy, qz, qw], dtype=np.float64)
    x, y, z, w = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _pose_from_tum(values: list[str]) -> np.ndarray:
    tx, ty, tz, qx, qy, qz, qw = (float(v) for v in values)
    pose = np.eye(4)
    pose[:3, :3] = quaternion_to_rotation(qx, qy, qz, qw)
    pose[:3, 3] = (tx, ty, tz)
    return pose


def read_tum_list(path: Path) -> list[tuple[float, list[str]]]:
    """``(timestamp, rest of the line)`` of a TUM list file, comments and blank lines skipped."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.replace(",", " ").split()
        if not parts or parts[0].startswith("#"):
            continue
        try:
            rows.append((float(parts[0]), parts[1:]))
        except ValueError:
            raise ValueError(f"{path}:{number}: expected a timestamp first, got {line!r}") from None
    return rows


def associate(first: list[float], second: list[float], max_difference: float = TUM_MAX_DIFFERENCE) -> list[tuple[int, int]]:
    """Index pairs of timestamps at most ``max_difference`` apart, closest pairs first, each index
    used once (TUM's ``associate.py`` rule); returned in the order of ``first``."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    order = np.argsort(b)
    sorted_b = b[order]
    candidates = []
    for i, t in enumerate(a):
        lo = np.searchsorted(sorted_b, t - max_difference, side="left")
        hi = np.searchsorted(sorted_b, t + max_difference, side="right")
        for j in order[lo:hi]:
            candidates.append((abs(t - b[j]), i, int(j)))
    candidates.sort()
    used_a, used_b, pairs = set(), set(), []
    for _, i, j in candidates:
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            pairs.append((i, j))
    return sorted(pairs)


def load_tum(root: Path, options: LoadOptions) -> list[EvalSequence]:
    rgb = read_tum_list(root / "rgb.txt")
    depth = read_tum_list(root / "depth.txt") if (root / "depth.txt").is_file() else []
    truth = read_tum_list(root / "groundtruth.txt") if (root / "groundtruth.txt").is_file() else []
    with_depth = dict(associate([t for t, _ in rgb], [t for t, _ in depth])) if depth else {}
    with_pose = dict(associate([t for t, _ in rgb], [t for t, _ in truth])) if truth else {}
    if options.intrinsics:
        fx, fy, cx, cy = options.intrinsics
    else:
        sensor = next((s for s in TUM_INTRINSICS if s in root.name), "default")
        fx, fy, cx, cy = TUM_INTRINSICS[sensor]
    records = []
    for i, (stamp, rest) in enumerate(rgb):
        # Keep frames that have every stream the sequence has (TUM's associated list).
        if (depth and i not in with_depth) or (truth and i not in with_pose):
            continue
        records.append(FrameRecord(
            image=root / rest[0], name=f"{stamp:.6f}",
            depth=root / depth[with_depth[i]][1][0] if depth else None,
            camera_to_world=_pose_from_tum(truth[with_pose[i]][1][:7]) if truth else None,
            intrinsics=_matrix(fx, fy, cx, cy),
        ))
    return [options.build(root.name, records, depth_scale=options.depth_scale or TUM_DEPTH_SCALE,
                          metadata={"format": "tum", "associated_frames": len(records), "intrinsics": [fx, fy, cx, cy]})]


def _read_matrix(path: Path) -> np.ndarray:
    values = np.array(Path(path).read_text().split(), dtype=np.float64)
    if values.size == 16:
        return values.reshape(4, 4)
    if values.size == 9:
        return values.reshape(3, 3)
    if values.size == 4:
        return _matrix(*values)
    raise ValueError(f"{path}: expected a 4x4 or 3x3 matrix (or fx fy cx cy), got {values.size} numbers")


def load_seven_scenes(root: Path, options: LoadOptions) -> list[EvalSequence]:
    folders = [root] if any(root.glob("frame-*.color.png")) else sorted(p for p in root.glob("seq-*") if p.is_dir())
    if options.sequences:
        folders = [p for p in folders if p.name in options.sequences]
    if not folders:
        raise ValueError(f"{root}: no 7-Scenes frames (frame-XXXXXX.color.png) or seq-XX folders"
                         + (f" named {options.sequences}" if options.sequences else ""))
    k = _matrix(*(options.intrinsics or SEVEN_SCENES_INTRINSICS))
    sequences = []
    for folder in folders:
        records = []
        for color in sorted(folder.glob("frame-*.color.png")):
            stem = color.name[: -len(".color.png")]
            records.append(FrameRecord(image=color, name=stem, depth=folder / f"{stem}.depth.png",
                                       camera_to_world=_read_matrix(folder / f"{stem}.pose.txt"), intrinsics=k))
        name = folder.name if folder == root else f"{root.name}/{folder.name}"
        sequences.append(options.build(name, records, depth_scale=options.depth_scale or MILLIMETRES,
                                       depth_invalid=SEVEN_SCENES_INVALID, metadata={"format": "7scenes"}))
    return sequences


def _numbered(folder: Path, suffixes: tuple[str, ...]) -> dict[int, Path]:
    """Files named ``N.ext`` by their number N."""
    return {int(p.stem): p for p in folder.iterdir() if p.stem.isdigit() and p.suffix.lower() in suffixes}


def load_scannet(root: Path, options: LoadOptions) -> list[EvalSequence]:
    colors = _numbered(root / "color", IMAGE_SUFFIXES)
    depths = _numbered(root / "depth", (".png",))
    poses = _numbered(root / "pose", (".txt",))
    intrinsic_file = root / "intrinsic" / "intrinsic_depth.txt"
    if options.intrinsics:
        k = _matrix(*options.intrinsics)
    elif intrinsic_file.is_file():
        k = _read_matrix(intrinsic_file)[:3, :3]
    else:
        raise ValueError(f"{root}: {intrinsic_file.relative_to(root)} is missing (or pass --intrinsics fx,fy,cx,cy)")
    records, skipped = [], 0
    for number in sorted(set(colors) & set(depths) & set(poses)):
        pose = _read_matrix(poses[number])
        if not np.isfinite(pose).all():
            skipped += 1
            continue
        records.append(FrameRecord(image=colors[number], name=str(number), depth=depths[number], camera_to_world=pose,
                                   intrinsics=k))
    if not records:
        raise ValueError(f"{root}: no frame has colour, depth and pose (color/N.jpg, depth/N.png, pose/N.txt)")
    # The colour images go to the depth camera's size, whose intrinsics describe the geometry.
    return [options.build(root.name, records, depth_scale=options.depth_scale or MILLIMETRES,
                          image_size=_image_size(records[0].depth),
                          metadata={"format": "scannet", "skipped_invalid_poses": skipped})]


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file, read from its header."""
    with Image.open(path) as img:
        return img.size


def load_folder(root: Path, options: LoadOptions) -> list[EvalSequence]:
    image_dir = root / "images" if (root / "images").is_dir() else root
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
    k = None
    if options.intrinsics:
        k = _matrix(*options.intrinsics)
    elif (root / "intrinsics.txt").is_file():
        k = _read_matrix(root / "intrinsics.txt")[:3, :3]

    def find(folder: str, suffixes: tuple[str, ...], stem: str) -> Optional[Path]:
        return next((root / folder / f"{stem}{s}" for s in suffixes if (root / folder / f"{stem}{s}").is_file()), None)

    records = []
    for image in images:
        depth = find("depth", (".png", ".npy"), image.stem)
        pose = find("poses", (".txt",), image.stem)
        records.append(FrameRecord(image=image, name=image.stem, depth=depth,
                                   camera_to_world=_read_matrix(pose) if pose else None, intrinsics=k))
    return [options.build(root.name, records, depth_scale=options.depth_scale or MILLIMETRES,
                          metadata={"format": "folder"})]


def load_synthetic(root: Path, options: LoadOptions) -> list[EvalSequence]:
    """A ``stac synth`` folder: its frames and exact ground truth, at the model's input size."""
    import tempfile

    from ..data.io import GROUND_TRUTH_FILE, FRAME_PATTERN

    with np.load(root / GROUND_TRUTH_FILE, allow_pickle=False) as data:
        depth, valid = data["depth"], data["valid"]
        extrinsics, intrinsics = data["extrinsics"], data["intrinsics"]
    with tempfile.TemporaryDirectory() as tmp:
        records = []
        for i in range(depth.shape[0]):
            # Depth as float .npy (metres, 0 where invalid) so the shared path reads it losslessly.
            depth_path = Path(tmp) / f"{i:05d}.npy"
            np.save(depth_path, np.where(valid[i], depth[i], 0.0).astype(np.float32))
            pose = np.eye(4)
            pose[:3, :4] = extrinsics[i]
            records.append(FrameRecord(image=root / FRAME_PATTERN.format(i), name=f"{i:05d}", depth=depth_path,
                                       camera_to_world=np.linalg.inv(pose), intrinsics=intrinsics[i]))
        return [options.build(root.name, records, metadata={"format": "synthetic"})]


FORMATS: dict[str, Callable[[Path, LoadOptions], list[EvalSequence]]] = {
    "tum": load_tum,
    "7scenes": load_seven_scenes,
    "scannet": load_scannet,
    "folder": load_folder,
    "synthetic": load_synthetic,
}


def detect_format(root: Path) -> str:
    """The format of a dataset folder, from the files that mark each one."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"not a folder: {root}")
    if (root / "rgb.txt").is_file():
        return "tum"
    if any(root.glob("frame-*.color.png")) or any(re.fullmatch(r"seq-\d+", p.name) for p in root.iterdir() if p.is_dir()):
        return "7scenes"
    if all((root / d).is_dir() for d in ("color", "depth", "pose")):
        return "scannet"
    if (root / "ground_truth.npz").is_file():
        return "synthetic"
    return "folder"


def load_sequences(root: Path, format: str = "auto", options: Optional[LoadOptions] = None) -> list[EvalSequence]:
    """Every sequence under ``root`` in ``format`` ("auto" detects it), subsampled and preprocessed."""
    root = Path(root)
    options = options or LoadOptions()
    name = detect_format(root) if format == "auto" else format
    if name not in FORMATS:
        raise ValueError(f"unknown dataset format {format!r}; choose one of {['auto', *FORMATS]}")
    return FORMATS[name](root, options)
