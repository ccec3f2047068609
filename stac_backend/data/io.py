"""Saving and loading ``SyntheticSequence`` folders.

Layout of a sequence folder::

    frame_00000.png ... frame_{S-1:05d}.png   8-bit RGB frames
    ground_truth.npz                          depth, valid, extrinsics, intrinsics,
                                              world_points (optional), metadata (JSON string)

Frames are stored as PNG so any image tool (and any VGGT loader) can read them; they are therefore
quantised to 1/255 and ``read_sequence`` returns the quantised images. The geometry is stored
losslessly in float32. ``world_points`` can be left out to save space (it is the largest array); it
is then recomputed from depth and cameras on load, to float32 rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .camera import unproject_depth
from .sequence import SyntheticSequence

__all__ = ["write_sequence", "read_sequence", "GROUND_TRUTH_FILE", "FRAME_PATTERN"]

GROUND_TRUTH_FILE = "ground_truth.npz"
FRAME_PATTERN = "frame_{:05d}.png"


def write_sequence(
    seq: SyntheticSequence, out_dir: str | Path, *, include_world_points: bool = True, compress: bool = False
) -> list[Path]:
    """Write frames as PNG and the ground truth as one ``.npz``; returns the written paths.

    ``compress`` uses zip deflate for the ``.npz`` (smaller, much slower for large sequences).
    Existing files of the same names are overwritten; other files in ``out_dir`` are left alone.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    # Round (not truncate) to 8 bits so a write/read round trip is within half a level.
    frames = (seq.images.detach().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for index, frame in enumerate(frames):
        path = out / FRAME_PATTERN.format(index)
        Image.fromarray(frame).save(path)
        written.append(path)
    arrays = {
        "depth": seq.depth.detach().cpu().numpy().astype(np.float32),
        "valid": seq.valid.detach().cpu().numpy().astype(bool),
        "extrinsics": seq.extrinsics.detach().cpu().numpy().astype(np.float32),
        "intrinsics": seq.intrinsics.detach().cpu().numpy().astype(np.float32),
        "metadata": np.array(json.dumps(seq.metadata)),
    }
    if include_world_points:
        arrays["world_points"] = seq.world_points.detach().cpu().numpy().astype(np.float32)
    gt_path = out / GROUND_TRUTH_FILE
    (np.savez_compressed if compress else np.savez)(gt_path, **arrays)
    written.append(gt_path)
    return written


def read_sequence(directory: str | Path, device: torch.device | str = "cpu") -> SyntheticSequence:
    """Load a folder written by ``write_sequence`` (frames in index order) onto ``device``."""
    root = Path(directory)
    gt_path = root / GROUND_TRUTH_FILE
    if not gt_path.is_file():
        raise ValueError(f"{root} is not a sequence folder: {GROUND_TRUTH_FILE} is missing")
    with np.load(gt_path, allow_pickle=False) as data:
        depth = torch.from_numpy(data["depth"])
        valid = torch.from_numpy(data["valid"])
        extrinsics = torch.from_numpy(data["extrinsics"])
        intrinsics = torch.from_numpy(data["intrinsics"])
        metadata = json.loads(str(data["metadata"]))
        world_points = torch.from_numpy(data["world_points"]) if "world_points" in data.files else None
    num_frames, height, width = depth.shape
    images = []
    for index in range(num_frames):
        path = root / FRAME_PATTERN.format(index)
        if not path.is_file():
            raise ValueError(f"{path} is missing: ground truth has {num_frames} frames")
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
        if array.shape[:2] != (height, width):
            raise ValueError(f"{path} is {array.shape[1]}x{array.shape[0]}, expected {width}x{height}")
        images.append(torch.from_numpy(array.copy()))
    images_t = torch.stack(images).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    if world_points is None:
        world_points = unproject_depth(depth, extrinsics, intrinsics)
        world_points = torch.where(valid.unsqueeze(-1), world_points, torch.zeros_like(world_points))
    seq = SyntheticSequence(
        images=images_t,
        depth=depth,
        valid=valid,
        world_points=world_points,
        extrinsics=extrinsics,
        intrinsics=intrinsics,
        metadata=metadata,
    )
    return seq.to(device)
