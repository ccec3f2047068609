"""Where frames come from: a folder of images, a video file, or a generated synthetic scene.

Every source yields preprocessed frames [3, H, W] float in [0, 1] (RGB), all of one size, lazily,
so a long video never has to fit in memory. Sources with a clock (videos) say their frame rate
(``fps``), which the results use for timestamps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import torch
from PIL import Image
from torch import Tensor

from .model.preprocess import list_images, preprocess_image

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")


class FrameSource:
    """An iterable of frames with a known (or unknown, None) length."""

    def __init__(self, frames: Iterator[Tensor], length: Optional[int], description: str, fps: Optional[float] = None):
        self._frames = frames
        self.length = length
        self.description = description
        self.fps = fps

    def __iter__(self) -> Iterator[Tensor]:
        return self._frames

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("this source does not know its length")
        return self.length


def folder_source(folder: Path, mode: str = "crop", target: int = 518, max_frames: Optional[int] = None) -> FrameSource:
    files = list_images(folder)[:max_frames]

    def frames() -> Iterator[Tensor]:
        size = None
        for path in files:
            with Image.open(path) as img:
                frame = preprocess_image(img, mode, target)
            if size is not None and frame.shape != size:
                raise ValueError(f"{path.name} preprocesses to {tuple(frame.shape[1:])}, earlier frames to {tuple(size[1:])}; "
                                 "a stream needs one frame size (use --mode pad for mixed aspect ratios)")
            size = frame.shape
            yield frame

    return FrameSource(frames(), len(files), f"{len(files)} images in {folder}")


def video_source(path: Path, mode: str = "crop", target: int = 518, max_frames: Optional[int] = None, every: int = 1) -> FrameSource:
    try:
        import av  # PyAV: optional, `pip install stac-backend[video]`
    except ImportError:
        raise ValueError(f"reading video needs PyAV: pip install av (or extract frames to a folder), file {path}") from None

    with av.open(str(path)) as container:
        rate = container.streams.video[0].average_rate
    fps = float(rate) / every if rate else None

    def frames() -> Iterator[Tensor]:
        with av.open(str(path)) as container:
            emitted = 0
            for i, frame in enumerate(container.decode(video=0)):
                if i % every:
                    continue
                yield preprocess_image(frame.to_image(), mode, target)
                emitted += 1
                if max_frames is not None and emitted >= max_frames:
                    return

    return FrameSource(frames(), max_frames, f"video {path}", fps=fps)


def synthetic_source(num_frames: int, height: int, width: int, trajectory: str = "loop", seed: int = 0) -> FrameSource:
    from .data import make_sequence

    seq = make_sequence(num_frames=num_frames, height=height, width=width, trajectory=trajectory, seed=seed)
    return FrameSource(iter(list(seq.images)), num_frames, f"synthetic {trajectory} scene, {num_frames} frames {width}x{height}")


def open_source(spec: str, mode: str = "crop", target: int = 518, max_frames: Optional[int] = None) -> FrameSource:
    """A folder path, a video path, or ``synthetic[:frames]`` (frames at the model's size)."""
    if spec.startswith("synthetic"):
        count = int(spec.split(":", 1)[1]) if ":" in spec else (max_frames or 32)
        height = int(round(target * 3 / 4 / 14) * 14)
        return synthetic_source(count, height, target)
    path = Path(spec)
    if path.is_dir():
        return folder_source(path, mode, target, max_frames)
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        return video_source(path, mode, target, max_frames)
    if not path.exists():
        raise ValueError(f"no such file or folder: {spec}")
    raise ValueError(f"cannot read {spec}: expected a folder of images or a video ({', '.join(VIDEO_SUFFIXES)})")


def chunks(frames, size: int) -> Iterator[Tensor]:
    """Group frames into stacked chunks [<= size, 3, H, W]."""
    batch: list[Tensor] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)

