"""The viewer (stac view / --view) on an output folder written by ReconstructionWriter: scene loading,
frustum geometry, the software snapshot, the PyAV depth video and the viser live view."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from PIL import Image

from stac_backend.results import ReconstructionWriter
from stac_backend.viewer import load_scene, view_folder
from stac_backend.viewer.scene import Camera, colorize, frustum_segments

H, W = 28, 42


def camera_at(x: float) -> np.ndarray:
    extr = np.eye(3, 4)
    extr[0, 3] = -x  # camera-from-world: the centre sits at +x
    return extr


@pytest.fixture
def folder(tmp_path):
    """Four frames looking down +z at a plane 2 units away, the camera sliding along x."""
    out = tmp_path / "run"
    writer = ReconstructionWriter(out, source="synthetic test", fps=10.0)
    K = np.array([[40.0, 0, W / 2], [0, 40.0, H / 2], [0, 0, 1]])
    v, u = np.mgrid[0:H, 0:W].astype(np.float32)
    for k in range(4):
        depth = np.full((H, W), 2.0, np.float32)
        x = (u - W / 2) / 40.0 * depth + 0.1 * k
        y = (v - H / 2) / 40.0 * depth
        points = np.stack([x, y, depth], -1)
        image = np.stack([u / W, v / H, np.full_like(u, 0.5)], 0)
        writer.add(k, {"depth": depth, "depth_conf": 1 + u / W, "world_points": points,
                       "world_points_conf": np.ones((H, W), np.float32), "extrinsics": camera_at(0.1 * k),
                       "intrinsics": K}, image)
    writer.finish()
    return out


def test_scene_loads_points_colours_cameras_and_frames(folder):
    scene = load_scene(folder)
    assert len(scene.cameras) == 4 and len(scene.frame_files) == 4
    assert scene.points.shape[1] == 3 and scene.colors.dtype == np.uint8 and len(scene.colors) == len(scene.points)
    assert np.allclose(scene.cameras[3].center, [0.3, 0, 0])
    assert (scene.cameras[0].width, scene.cameras[0].height) == (W, H)
    assert scene.frame(0)["rgb"].shape == (H, W, 3)
    with pytest.raises(FileNotFoundError, match="not an output folder"):
        load_scene(folder / "frames")


def test_frustum_corners_are_the_image_corners_at_the_given_depth():
    K = np.array([[40.0, 0, W / 2], [0, 40.0, H / 2], [0, 0, 1]])
    segments = frustum_segments(Camera(0, camera_at(1.0), K, W, H), scale=2.0)
    assert segments.shape == (8, 2, 3)
    apex, corner = segments[0]
    assert np.allclose(apex, [1, 0, 0])
    assert np.allclose(corner, [1 - W / 2 / 40 * 2, -H / 2 / 40 * 2, 2])  # pixel (0, 0) at depth 2


def test_colorize_orders_values_and_blacks_out_non_finite():
    rgb = colorize(np.array([[0.0, 0.5, 1.0, np.nan]]), 0.0, 1.0)
    assert rgb.shape == (1, 4, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].sum() < rgb[0, 1].sum() < rgb[0, 2].sum() and rgb[0, 3].tolist() == [0, 0, 0]


def test_snapshot_and_video_without_a_display(folder, tmp_path):
    av = pytest.importorskip("av")
    assert view_folder(folder, serve=False, snapshot=tmp_path / "view.png", video=tmp_path / "depth.mp4") == 0
    image = np.asarray(Image.open(tmp_path / "view.png"))
    assert image.shape == (720, 1440, 3)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # points, frustums and maps were drawn
    with av.open(str(tmp_path / "depth.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 4 and frames[0].shape == (H, 3 * W, 3)  # input | depth | confidence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_live_viewer_takes_frames_and_saves_a_recording(folder, tmp_path):
    pytest.importorskip("viser")
    from stac_backend.viewer.live import LiveViewer

    viewer = LiveViewer(host="127.0.0.1", port=free_port())
    try:
        assert viewer.url.startswith("http://127.0.0.1:")
        scene = load_scene(folder)
        for k in range(2):
            frame = scene.frame(k)
            viewer.add_frame(k, frame, frame["rgb"])
        assert len(viewer.centers) == 2
        viewer.show_scene(scene)
        recording = tmp_path / "scene.viser"
        viewer.save(recording)
        assert recording.stat().st_size > 1000
    finally:
        viewer.stop()
