"""Dataset loaders of ``stac eval`` on small fixtures written in each dataset's own format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stac_backend.data import make_sequence, write_sequence
from stac_backend.evaluation import LoadOptions, associate, detect_format, load_sequences
from stac_backend.evaluation.datasets import quaternion_to_rotation
from stac_backend.evaluation.sequence import fit_depth, fit_intrinsics

W, H = 64, 48  # fixture images; with target 56 they become 56x42 (no crop)


def _rgb(path, seed, size=(W, H)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _depth_png(path, raw: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(raw.astype(np.uint16)).save(path)


def _pose(x: float) -> np.ndarray:
    """Camera-to-world: rotated 90 degrees about z, centre at (x, 0, 0)."""
    pose = np.eye(4)
    pose[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
    pose[0, 3] = x
    return pose


def test_associate_takes_closest_pairs_once_within_the_limit():
    # 1.0 has no partner within 0.02 s; 2.0 prefers 2.005 over 1.99; 3.0 and 3.01 compete for 3.009.
    pairs = associate([1.0, 2.0, 3.0, 3.01], [1.03, 1.99, 2.005, 3.009])
    assert pairs == [(1, 2), (3, 3)]


def test_tum_associates_streams_and_reads_depth_at_5000_per_metre(tmp_path):
    root = tmp_path / "rgbd_dataset_freiburg1_xyz"
    rgb_times = [10.0, 10.1, 10.2, 10.3]
    depth_times = [10.004, 10.105, 10.21, 10.35]  # the last rgb frame has no depth within 0.02 s
    for i, t in enumerate(rgb_times):
        _rgb(root / "rgb" / f"{t:.6f}.png", i)
    raw = np.full((H, W), 5000, np.uint16)
    raw[:, : W // 2] = 0  # left half: no depth
    for i, t in enumerate(depth_times):
        _depth_png(root / "depth" / f"{t:.6f}.png", raw * (i + 1))
    (root / "rgb.txt").write_text("# color images\n# timestamp filename\n"
                                  + "".join(f"{t:.6f} rgb/{t:.6f}.png\n" for t in rgb_times))
    (root / "depth.txt").write_text("# depth\n" + "".join(f"{t:.6f} depth/{t:.6f}.png\n" for t in depth_times))
    truth = ["# timestamp tx ty tz qx qy qz qw"]
    for k in range(0, 40):  # 100 Hz ground truth; x = time offset, so the chosen pose names its timestamp
        t = 10.0 + 0.01 * k + 0.003
        truth.append(f"{t:.4f} {t - 10.0:.4f} 0 0 0 0 0.7071068 0.7071068")
    (root / "groundtruth.txt").write_text("\n".join(truth) + "\n")

    assert detect_format(root) == "tum"
    (seq,) = load_sequences(root, "auto", LoadOptions(target=56))
    assert seq.frame_names == ["10.000000", "10.100000", "10.200000"]
    assert seq.images.shape == (3, 3, 42, 56) and seq.images.dtype == torch.uint8
    # depth PNG value / 5000 = metres; the left half stays invalid after resizing
    assert torch.allclose(seq.depth[:, :, -1], torch.tensor([1.0, 2.0, 3.0])[:, None])
    assert not seq.valid[:, :, : 56 // 2 - 1].any() and seq.valid[:, :, 56 // 2 + 1 :].all()
    # freiburg1 intrinsics scaled by 56/64 (pixel centres at integers)
    k = seq.intrinsics[0]
    assert k[0, 0].item() == pytest.approx(517.3 * 56 / 64, rel=1e-5)
    assert k[0, 2].item() == pytest.approx((318.6 + 0.5) * 56 / 64 - 0.5, rel=1e-5)
    # poses: the closest GT sample (10.003, 10.103, ...) relative to the first frame's camera
    centers = -(seq.extrinsics[:, :, :3].transpose(1, 2) @ seq.extrinsics[:, :, 3:])[..., 0]
    # camera axes are the world rotated 90 degrees about z: world +x is camera -y
    assert torch.allclose(centers, torch.tensor([[0.0, 0, 0], [0, -0.1, 0], [0, -0.2, 0]]), atol=1e-5)
    assert seq.world_points is not None and seq.metadata["associated_frames"] == 3


def test_seven_scenes_millimetres_invalid_value_poses_and_stride(tmp_path):
    scene = tmp_path / "chess"
    for seq_name in ("seq-01", "seq-02"):
        for i in range(5):
            stem = scene / seq_name / f"frame-{i:06d}"
            _rgb(stem.with_name(stem.name + ".color.png"), i, size=(W, H))
            raw = np.full((H, W), 1500 + 100 * i, np.uint16)
            raw[0, :] = 65535  # "no depth" in 7-Scenes
            _depth_png(stem.with_name(stem.name + ".depth.png"), raw)
            np.savetxt(_mkdir(stem.parent) / (stem.name + ".pose.txt"), _pose(0.5 * i))
    assert detect_format(scene) == "7scenes"
    sequences = load_sequences(scene, "7scenes", LoadOptions(target=56, stride=2, sequences=["seq-02"]))
    assert [s.name for s in sequences] == ["chess/seq-02"]
    seq = sequences[0]
    assert seq.frame_names == ["frame-000000", "frame-000002", "frame-000004"]
    assert torch.allclose(seq.depth[:, -1, 0], torch.tensor([1.5, 1.7, 1.9]))
    assert not seq.valid[:, 0].any()
    assert seq.intrinsics[0, 0, 0].item() == pytest.approx(585 * 56 / 64, rel=1e-5)
    centers = -(seq.extrinsics[:, :, :3].transpose(1, 2) @ seq.extrinsics[:, :, 3:])[..., 0]
    assert torch.allclose(centers, torch.tensor([[0.0, 0, 0], [0, -1.0, 0], [0, -2.0, 0]]), atol=1e-5)
    # one folder of frames is a sequence by itself
    (single,) = load_sequences(scene / "seq-01", "auto", LoadOptions(target=56, max_frames=2))
    assert single.num_frames == 2


def test_scannet_uses_the_depth_camera_and_skips_invalid_poses(tmp_path):
    root = tmp_path / "scene0000_00"
    for i in range(3):
        _rgb(root / "color" / f"{i}.jpg", i, size=(2 * W, 2 * H))  # colour at twice the depth resolution
        _depth_png(root / "depth" / f"{i}.png", np.full((H, W), 2000, np.uint16))
        np.savetxt(_mkdir(root / "pose") / f"{i}.txt", _pose(i) if i != 1 else np.full((4, 4), -np.inf))
    k = np.eye(4)
    k[0, 0], k[1, 1], k[0, 2], k[1, 2] = 60.0, 61.0, 31.5, 23.5
    (root / "intrinsic").mkdir()
    np.savetxt(root / "intrinsic" / "intrinsic_depth.txt", k)
    assert detect_format(root) == "scannet"
    (seq,) = load_sequences(root, "auto", LoadOptions(target=56))
    assert seq.frame_names == ["0", "2"] and seq.metadata["skipped_invalid_poses"] == 1
    assert seq.images.shape[-2:] == (42, 56)
    assert torch.allclose(seq.depth, torch.full_like(seq.depth, 2.0))
    assert seq.intrinsics[0, 0, 0].item() == pytest.approx(60.0 * 56 / 64, rel=1e-5)


def test_generic_folder_with_and_without_ground_truth(tmp_path):
    root = tmp_path / "capture"
    for i in range(3):
        _rgb(root / "images" / f"img_{i}.png", i)
        np.save(_mkdir(root / "depth") / f"img_{i}.npy", np.full((H, W), 1.25, np.float32))
        np.savetxt(_mkdir(root / "poses") / f"img_{i}.txt", _pose(i))
    (root / "intrinsics.txt").write_text("50 50 31.5 23.5\n")
    assert detect_format(root) == "folder"
    (seq,) = load_sequences(root, "auto", LoadOptions(target=56))
    assert set(seq.ground_truth()) == {"depth", "valid", "extrinsics", "world_points"}
    assert torch.allclose(seq.depth, torch.full_like(seq.depth, 1.25))

    bare = tmp_path / "bare"
    for i in range(2):
        _rgb(bare / f"{i}.jpg", i)
    (seq,) = load_sequences(bare, "auto", LoadOptions(target=56))
    assert seq.ground_truth() == {} and seq.num_frames == 2


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_synthetic_folder_round_trips_ground_truth(tmp_path):
    original = make_sequence(3, 42, 56, seed=3, world_frame="first_camera")
    write_sequence(original, tmp_path / "synth")
    assert detect_format(tmp_path / "synth") == "synthetic"
    (seq,) = load_sequences(tmp_path / "synth", "auto", LoadOptions(target=56))
    assert torch.equal(seq.valid, original.valid)
    assert torch.allclose(seq.depth, torch.where(original.valid, original.depth, 0.0))
    assert torch.allclose(seq.extrinsics, original.extrinsics, atol=1e-5)
    assert torch.allclose(seq.world_points, original.world_points, atol=1e-4)


def test_fitting_moves_intrinsics_and_depth_with_the_crop():
    # 64x80 portrait, crop to 56 wide: resized to 56x70, then 7 rows cropped top and bottom.
    k = np.array([[100.0, 0, 31.5], [0, 100.0, 39.5], [0, 0, 1]])
    fitted = fit_intrinsics(k, 64, 80, "crop", 56)
    s = 56 / 64
    assert fitted[1, 2] == pytest.approx((39.5 + 0.5) * s - 0.5 - 7)
    assert fitted[0, 0] == pytest.approx(100 * s) and fitted[1, 1] == pytest.approx(100 * 70 / 80)
    rows = np.repeat(np.arange(80, dtype=np.float32)[:, None] + 1, 64, axis=1)
    depth = fit_depth(rows, 64, 80, "crop", 56)
    assert depth.shape == (56, 56) and depth[0, 0] > 8 and depth[-1, 0] < 73  # the middle rows survive
    padded = fit_depth(rows, 64, 80, "pad", 56)
    assert padded.shape == (56, 56) and (padded[:, :5] == 0).all()  # padding has no depth


def test_quaternion_convention_is_xyzw():
    rotation = quaternion_to_rotation(0, 0, np.sin(np.pi / 4), np.cos(np.pi / 4))  # 90 degrees about z
    assert np.allclose(rotation @ [1, 0, 0], [0, 1, 0])


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        load_sequences(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown dataset format"):
        load_sequences(tmp_path, "kitti")
    with pytest.raises(ValueError, match="stride"):
        LoadOptions(stride=0)
