"""A depth | confidence video of a stream (PyAV: ``pip install "stac-backend[video]"``).

Each frame of the video is [input | depth | depth confidence] side by side; depth uses one colour
range for the whole stream (2nd-98th percentile over all frames) so that brightness means the same
distance throughout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .scene import Scene, colorize


def _codec(av) -> str:
    for name in ("libx264", "h264", "mpeg4"):
        if name in av.codecs_available:
            return name
    raise ValueError("PyAV has no H.264 or MPEG-4 encoder here; install a full FFmpeg build of av")


def write_depth_video(scene: Scene, path, fps: float = 10.0) -> Path:
    """Write the video and return its path."""
    try:
        import av
    except ImportError:
        raise ValueError('a depth video needs PyAV: pip install "stac-backend[video]"') from None
    if not scene.frame_files:
        raise ValueError(f"{scene.folder} has no frames/frame_*.npz (streamed with --no-frames?)")
    frames = [scene.frame(k) for k in range(len(scene.frame_files))]
    depth = np.concatenate([f["depth"].astype(np.float64).reshape(-1) for f in frames])
    depth = depth[np.isfinite(depth)]
    lo, hi = (np.percentile(depth, 2), np.percentile(depth, 98)) if len(depth) else (0.0, 1.0)
    conf = np.concatenate([f["depth_conf"].astype(np.float64).reshape(-1) for f in frames if "depth_conf" in f])
    conf = conf[np.isfinite(conf)] if len(conf) else conf
    clo, chi = (np.percentile(conf, 2), np.percentile(conf, 98)) if len(conf) else (0.0, 1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = None
        for f in frames:
            tiles = [f["rgb"]] if "rgb" in f else []
            tiles.append(colorize(f["depth"], lo, hi))
            if "depth_conf" in f:
                tiles.append(colorize(f["depth_conf"], clo, chi))
            image = np.concatenate(tiles, axis=1)
            h, w = image.shape[:2]
            image = image[: h - h % 2, : w - w % 2]  # yuv420p needs even sizes
            if stream is None:
                stream = container.add_stream(_codec(av), rate=int(round(fps)))
                stream.width, stream.height, stream.pix_fmt = image.shape[1], image.shape[0], "yuv420p"
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
