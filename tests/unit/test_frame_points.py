"""points.ply and the viewer take each frame's points from depth + its predicted camera by default,
or from the point head: the unprojection equals the one the metrics use, and ground-truth depth
with ground-truth cameras gives back the ground-truth world points."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stac_backend.data import make_sequence
from stac_backend.data.camera import unproject_depth
from stac_backend.results import ReconstructionWriter, frame_world_points, read_ply_points
from stac_backend.viewer.live import confident_points


@pytest.fixture(scope="module")
def scene():
    return make_sequence(3, 28, 42, seed=3)


def frame(scene, k: int) -> dict:
    return {"depth": scene.depth[k].numpy()[..., None], "depth_conf": 1 + scene.depth[k].numpy(),
            "world_points": np.zeros((28, 42, 3), np.float32), "world_points_conf": np.ones((28, 42), np.float32),
            "extrinsics": scene.extrinsics[k].numpy(), "intrinsics": scene.intrinsics[k].numpy()}


def test_depth_points_are_the_metrics_unprojection_and_the_truth(scene):
    for k in range(3):
        points = frame_world_points(frame(scene, k))
        expected = unproject_depth(scene.depth[k:k + 1], scene.extrinsics[k:k + 1], scene.intrinsics[k:k + 1])
        np.testing.assert_allclose(points, expected.reshape(-1, 3).numpy(), atol=1e-4)
        valid = scene.valid[k].reshape(-1).numpy()
        np.testing.assert_allclose(points[valid], scene.world_points[k].reshape(-1, 3).numpy()[valid], atol=1e-3)


def test_head_points_and_fallbacks(scene):
    arrays = frame(scene, 0)
    assert np.array_equal(frame_world_points(arrays, "head"), np.zeros((28 * 42, 3), np.float32))
    no_camera = {k: v for k, v in arrays.items() if k != "intrinsics"}
    assert np.array_equal(frame_world_points(no_camera), np.zeros((28 * 42, 3), np.float32))  # the head's map
    assert frame_world_points({"depth": arrays["depth"]}) is None
    with pytest.raises(ValueError, match="points_from"):
        frame_world_points(arrays, "both")
    with pytest.raises(ValueError, match="points_from"):
        ReconstructionWriter(".", points_from="both")


@pytest.mark.parametrize("points_from", ["depth", "head"])
def test_writer_and_viewer_take_the_chosen_points(scene, tmp_path, points_from):
    writer = ReconstructionWriter(tmp_path, points_from=points_from, save_frames=False)
    for k in range(3):
        writer.add(k, frame(scene, k))
    writer.finish()
    points = read_ply_points(tmp_path / "points.ply")
    assert len(points) == 3 * (28 * 42 // 2)  # the top half by depth_conf
    assert (np.abs(points).max() > 0) == (points_from == "depth")  # the head's map here is all zeros
    viewer_points, _ = confident_points(frame(scene, 0), None, 10_000, points_from=points_from)
    assert np.array_equal(viewer_points, points[: len(viewer_points)])
