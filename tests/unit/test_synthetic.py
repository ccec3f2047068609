"""Synthetic streaming scenes: determinism, geometric consistency, trajectories, I/O and CLI."""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stac_backend.data import (
    TRAJECTORIES,
    SyntheticSequence,
    camera_centers,
    make_scene,
    make_sequence,
    make_trajectory,
    project_points,
    read_sequence,
    render_frames,
    to_first_camera_frame,
    unproject_depth,
    write_sequence,
)
from stac_backend.data import cli
from stac_backend.data.scene import CAMERA_MAX, CAMERA_MIN_RADIUS

# Small frames keep the whole file at a couple of seconds on a 2-core CPU.
S, H, W = 8, 24, 32


@pytest.fixture(scope="module", params=sorted(TRAJECTORIES))
def sequence(request) -> SyntheticSequence:
    return make_sequence(S, H, W, trajectory=request.param, seed=5)


def test_shapes_dtypes_and_value_ranges(sequence: SyntheticSequence) -> None:
    assert sequence.images.shape == (S, 3, H, W) and sequence.images.dtype == torch.float32
    assert sequence.depth.shape == (S, H, W) and sequence.valid.dtype == torch.bool
    assert sequence.world_points.shape == (S, H, W, 3)
    assert sequence.extrinsics.shape == (S, 3, 4) and sequence.intrinsics.shape == (S, 3, 3)
    assert float(sequence.images.min()) >= 0.0 and float(sequence.images.max()) <= 1.0
    # Closed room: every ray hits a surface, in front of the camera and inside the room's diagonal.
    assert bool(sequence.valid.all())
    assert float(sequence.depth.min()) > 0.2 and float(sequence.depth.max()) < 10.0
    # Textured: no frame is flat colour.
    assert float(sequence.images.flatten(1).std(dim=1).min()) > 0.05


def test_depth_matches_world_points_through_cameras(sequence: SyntheticSequence) -> None:
    uv, z = project_points(sequence.world_points, sequence.extrinsics, sequence.intrinsics)
    assert torch.allclose(z[..., 0], sequence.depth, atol=1e-4)
    # Pixel (i, j) is at image coordinate (u, v) = (j, i) (VGGT's convention).
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    assert torch.allclose(uv[..., 0], u.expand(S, H, W), atol=1e-3)
    assert torch.allclose(uv[..., 1], v.expand(S, H, W), atol=1e-3)
    points = unproject_depth(sequence.depth, sequence.extrinsics, sequence.intrinsics)
    assert torch.allclose(points, sequence.world_points, atol=1e-4)


def test_cameras_are_opencv_pinholes(sequence: SyntheticSequence) -> None:
    rotation = sequence.extrinsics[:, :, :3]
    assert torch.allclose(rotation @ rotation.transpose(1, 2), torch.eye(3).expand(S, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(rotation), torch.ones(S), atol=1e-5)
    k = sequence.intrinsics
    assert torch.allclose(k[:, 0, 2], torch.full((S,), W / 2)) and torch.allclose(k[:, 1, 2], torch.full((S,), H / 2))
    focal = (W / 2) / math.tan(math.radians(60.0) / 2)
    assert torch.allclose(k[:, 0, 0], torch.full((S,), focal)) and torch.allclose(k[:, 1, 1], k[:, 0, 0])
    # Upright images: the camera's y axis (down) points against world z (up).
    assert bool((rotation[:, 1, 2] < -0.5).all())


def test_deterministic_from_seed() -> None:
    a = make_sequence(3, 12, 16, trajectory="random_walk", seed=11)
    b = make_sequence(3, 12, 16, trajectory="random_walk", seed=11)
    c = make_sequence(3, 12, 16, trajectory="random_walk", seed=12)
    for name in ("images", "depth", "valid", "world_points", "extrinsics", "intrinsics"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.metadata == b.metadata
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.extrinsics, c.extrinsics)


def test_trajectories_revisit() -> None:
    scene = make_scene(2)
    loop, _ = make_trajectory("loop", scene, 24, H, W, seed=2)
    assert torch.allclose(loop[-1], loop[0], atol=1e-5)  # loop closure: back to the start pose
    centers = camera_centers(loop)
    assert float((centers[12] - centers[0]).norm()) > 2.0  # ...after going around the room
    walk, _ = make_trajectory("back_and_forth", scene, 25, H, W, seed=2)
    assert torch.allclose(walk, walk.flip(0), atol=1e-5)  # frame i and S-1-i share their pose
    assert float((camera_centers(walk)[12] - camera_centers(walk)[0]).norm()) > 2.0


@pytest.mark.parametrize("name", sorted(TRAJECTORIES))
def test_trajectories_stay_in_the_free_band(name: str) -> None:
    scene = make_scene(4)
    extrinsics, _ = make_trajectory(name, scene, 60, H, W, seed=4)
    centers = camera_centers(extrinsics)
    half = scene.room_max[:2]
    assert bool((centers[:, :2].abs() <= CAMERA_MAX * half + 1e-5).all())
    assert bool((centers[:, :2].norm(dim=-1) >= CAMERA_MIN_RADIUS * float(half.min()) - 1e-5).all())
    assert bool(((centers[:, 2] > 1.1) & (centers[:, 2] < 1.9)).all())
    # Smooth: no teleporting between consecutive frames.
    assert float((centers[1:] - centers[:-1]).norm(dim=-1).max()) < 0.6
    # Looking into the room: the optical axis points towards the vertical axis of the room.
    forward = extrinsics[:, 2, :3]
    assert bool(((forward[:, :2] * -centers[:, :2]).sum(-1) > 0).all())


def test_first_camera_frame() -> None:
    seq = make_sequence(4, H, W, trajectory="loop", seed=1)
    first = to_first_camera_frame(seq)
    assert first.metadata["world_frame"] == "first_camera"
    assert torch.allclose(first.extrinsics[0], torch.eye(3, 4), atol=1e-6)
    # Frame 0's points are its camera coordinates: z equals depth.
    assert torch.allclose(first.world_points[0, ..., 2], seq.depth[0], atol=1e-4)
    uv, z = project_points(first.world_points, first.extrinsics, first.intrinsics)
    assert torch.allclose(z[..., 0], first.depth, atol=1e-4)
    # The stored transform maps scene points to the new world; applying twice changes nothing.
    transform = torch.tensor(first.metadata["world_from_scene"], dtype=torch.float32)
    mapped = seq.world_points @ transform[:3, :3].T + transform[:3, 3]
    assert torch.allclose(mapped, first.world_points, atol=1e-4)
    again = to_first_camera_frame(first)
    assert torch.allclose(again.world_points, first.world_points, atol=1e-5)
    assert torch.allclose(again.extrinsics, first.extrinsics, atol=1e-6)
    direct = make_sequence(4, H, W, trajectory="loop", seed=1, world_frame="first_camera")
    assert torch.allclose(direct.world_points, first.world_points)


def test_max_depth_marks_far_pixels_invalid() -> None:
    seq = make_sequence(2, H, W, seed=0, max_depth=3.0)
    full = make_sequence(2, H, W, seed=0)
    expected = full.depth <= 3.0
    assert torch.equal(seq.valid, expected) and not bool(expected.all())
    assert bool((seq.depth[~seq.valid] == 0).all()) and bool((seq.world_points[~seq.valid] == 0).all())


def test_render_chunking_does_not_change_results() -> None:
    scene = make_scene(3)
    extrinsics, intrinsics = make_trajectory("loop", scene, 3, H, W, seed=3)
    one = render_frames(scene, extrinsics, intrinsics, H, W)
    many = render_frames(scene, extrinsics, intrinsics, H, W, chunk_rays=97)
    assert torch.equal(one.depth, many.depth) and torch.allclose(one.images, many.images)


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError, match="unknown trajectory"):
        make_sequence(2, H, W, trajectory="spiral")
    with pytest.raises(ValueError):
        make_sequence(0, H, W)
    with pytest.raises(ValueError):
        make_sequence(2, H, W, fov_deg=0.0)
    with pytest.raises(ValueError, match="world_frame"):
        make_sequence(2, H, W, world_frame="gravity")


@pytest.mark.parametrize("include_world_points", [True, False])
def test_write_read_round_trip(tmp_path: Path, include_world_points: bool) -> None:
    seq = make_sequence(3, H, W, trajectory="back_and_forth", seed=9)
    paths = write_sequence(seq, tmp_path, include_world_points=include_world_points)
    assert [p.name for p in paths] == ["frame_00000.png", "frame_00001.png", "frame_00002.png", "ground_truth.npz"]
    back = read_sequence(tmp_path)
    assert (back.images - seq.images).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit PNG quantisation
    assert torch.equal(back.depth, seq.depth) and torch.equal(back.valid, seq.valid)
    assert torch.equal(back.extrinsics, seq.extrinsics) and torch.equal(back.intrinsics, seq.intrinsics)
    assert back.metadata == seq.metadata
    if include_world_points:
        assert torch.equal(back.world_points, seq.world_points)
    else:  # recomputed from depth and cameras
        assert torch.allclose(back.world_points, seq.world_points, atol=1e-4)


def test_read_rejects_incomplete_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ground_truth.npz"):
        read_sequence(tmp_path)
    write_sequence(make_sequence(2, H, W, seed=0), tmp_path)
    (tmp_path / "frame_00001.png").unlink()
    with pytest.raises(ValueError, match="frame_00001.png"):
        read_sequence(tmp_path)


def test_cli_registers_into_a_parent_parser(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser(prog="stac")
    cli.register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "seq"
    args = parser.parse_args(
        ["synth", "--frames", "3", "--height", "12", "--width", "16", "--trajectory", "random_walk", "--out", str(out)]
    )
    assert args.func(args) == 0
    assert "wrote 3 frames" in capsys.readouterr().out
    seq = read_sequence(out)
    assert seq.num_frames == 3 and (seq.height, seq.width) == (12, 16)
    assert seq.metadata["trajectory"] == "random_walk"


def test_cli_runs_standalone(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "stac_backend.data.cli", "synth", "--frames", "2", "--height", "8",
               "--width", "12", "--seed", "3", "--world-frame", "first_camera", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote 2 frames" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frame_00000.png", "frame_00001.png", "ground_truth.npz"]
    assert read_sequence(tmp_path).metadata["world_frame"] == "first_camera"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    cpu = make_sequence(4, H, W, trajectory="loop", seed=7)
    gpu = make_sequence(4, H, W, trajectory="loop", seed=7, device="cuda")
    assert gpu.images.is_cuda and gpu.extrinsics.is_cuda
    assert torch.allclose(gpu.extrinsics.cpu(), cpu.extrinsics, atol=1e-5)
    assert torch.allclose(gpu.depth.cpu(), cpu.depth, atol=1e-3)
    # Colours may differ where float rounding flips a texture cell edge; nearly all must agree.
    assert float(((gpu.images.cpu() - cpu.images).abs() > 1e-3).float().mean()) < 0.01
