"""Quality metrics on constructed cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stac_backend.data import make_sequence, to_first_camera_frame
from stac_backend.metrics import (
    Sim3,
    accuracy_completeness,
    ate_rmse,
    depth_metrics,
    evaluate_sequence,
    icp,
    nearest_neighbors,
    point_map_normals,
    pair_angle_errors,
    pose_auc,
    pose_metrics,
    reconstruction_metrics,
    relative_pose_errors,
    subsample_indices,
    umeyama,
)


def random_rotation(generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=dtype))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def axis_rotation(axis: str, angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    if axis == "z":
        return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    if axis == "x":
        return torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]], dtype=torch.float64)
    raise ValueError(axis)


def extrinsics_from(world_from_camera_rotations: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Camera-from-world [S, 3, 4] from camera-to-world rotations and camera centres."""
    rotation = world_from_camera_rotations.transpose(1, 2)
    return torch.cat([rotation, -(rotation @ centers.unsqueeze(-1))], dim=-1)


def grid_plane(n: int = 40, spacing: float = 0.02) -> torch.Tensor:
    """Point map [n, n, 3] of the plane z = 0."""
    ii, jj = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij")
    return torch.stack([jj * spacing, ii * spacing, torch.zeros_like(ii)], dim=-1)


# --------------------------------------------------------------------------- alignment


def test_umeyama_recovers_a_known_sim3_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    source = torch.randn(200, 3, generator=g, dtype=torch.float64)
    truth = Sim3(torch.tensor(2.5, dtype=torch.float64), random_rotation(g), torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    fit = umeyama(source, truth.apply(source))
    assert abs(float(fit.scale) - 2.5) < 1e-12
    assert torch.allclose(fit.rotation, truth.rotation, atol=1e-12)
    assert torch.allclose(fit.translation, truth.translation, atol=1e-12)
    # Without scale on a rigid motion: scale stays 1, the motion is recovered.
    rigid = Sim3(torch.tensor(1.0, dtype=torch.float64), truth.rotation, truth.translation)
    fit_rigid = umeyama(source, rigid.apply(source), with_scale=False)
    assert float(fit_rigid.scale) == 1.0 and torch.allclose(fit_rigid.rotation, truth.rotation, atol=1e-12)
    # Composition and inverse are consistent.
    assert torch.allclose(truth.inverse().compose(truth).apply(source), source, atol=1e-12)


def test_umeyama_never_returns_a_reflection_and_validates_input() -> None:
    g = torch.Generator().manual_seed(1)
    source = torch.randn(50, 3, generator=g, dtype=torch.float64)
    mirrored = source * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    assert float(torch.det(umeyama(source, mirrored).rotation)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 3"):
        umeyama(source[:2], source[:2])
    with pytest.raises(ValueError, match="coincident"):
        umeyama(torch.ones(5, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="same shape"):
        umeyama(source, source[:10])


def test_icp_fixes_a_small_known_rigid_offset() -> None:
    g = torch.Generator().manual_seed(2)
    target = torch.rand(3000, 3, generator=g, dtype=torch.float64)  # ~7 cm spacing in a 1 m cube
    offset = Sim3(torch.tensor(1.0, dtype=torch.float64), axis_rotation("z", math.radians(1.0)) @ axis_rotation("x", math.radians(0.5)),
                  torch.tensor([0.01, -0.015, 0.008], dtype=torch.float64))
    source = offset.inverse().apply(target)  # target = offset(source)
    result = icp(source, target, threshold=0.1, iterations=30)
    assert torch.allclose(result.transform.rotation, offset.rotation, atol=1e-9)
    assert torch.allclose(result.transform.translation, offset.translation, atol=1e-9)
    assert result.inlier_fraction == 1.0 and result.inlier_rmse < 1e-9
    assert result.iterations < 30  # stopped once converged


def test_icp_keeps_the_scale_of_its_initial_sim3() -> None:
    g = torch.Generator().manual_seed(3)
    target = torch.rand(1000, 3, generator=g, dtype=torch.float64)
    source = (target - 0.2) / 3.0  # target = 3 * source + 0.2 (no rotation)
    # The initial Sim(3) has the right scale but is 1 cm off; ICP fixes the offset, keeps the scale.
    init = Sim3(torch.tensor(3.0, dtype=torch.float64), torch.eye(3, dtype=torch.float64), torch.full((3,), 0.21, dtype=torch.float64))
    result = icp(source, target, init=init)
    assert float(result.transform.scale) == 3.0
    assert torch.allclose(result.transform.apply(source), target, atol=1e-9)


# --------------------------------------------------------------------------- neighbours


def test_nearest_neighbors_pruned_search_is_exact() -> None:
    g = torch.Generator().manual_seed(4)
    reference = torch.rand(30000, 3, generator=g) * torch.tensor([4.0, 3.0, 2.5])
    query = torch.rand(700, 3, generator=g) * 5.0 - 0.5  # some queries outside the reference box
    d_pruned, i_pruned = nearest_neighbors(query, reference, prune=True)
    d_brute, i_brute = nearest_neighbors(query, reference, prune=False)
    assert torch.equal(i_pruned, i_brute) and torch.equal(d_pruned, d_brute)
    d_self, i_self = nearest_neighbors(reference[:5000], reference, prune=True)
    assert float(d_self.max()) == 0.0 and torch.equal(i_self, torch.arange(5000))
    # Surface-like references (a rendered room) with noisy queries and a few far outliers.
    seq = make_sequence(2, 60, 80, seed=2)
    surface = seq.world_points[seq.valid]
    noisy = surface[::37] + 0.02 * torch.randn(surface[::37].shape, generator=g)
    noisy[:5] += 3.0
    d_pruned, _ = nearest_neighbors(noisy, surface, prune=True)
    d_brute, _ = nearest_neighbors(noisy, surface, prune=False)
    assert torch.equal(d_pruned, d_brute)


def test_subsampling_is_deterministic_and_nested() -> None:
    a = subsample_indices(1000, 100, seed=7)
    assert torch.equal(a, subsample_indices(1000, 100, seed=7))
    assert not torch.equal(a, subsample_indices(1000, 100, seed=8))
    assert set(a.tolist()) <= set(subsample_indices(1000, 400, seed=7).tolist())
    assert subsample_indices(50, 100) is None


# --------------------------------------------------------------------------- reconstruction


def test_accuracy_completeness_of_identical_and_shifted_clouds() -> None:
    plane = grid_plane().reshape(-1, 3)
    same = accuracy_completeness(plane, plane.clone())
    assert all(same[k] == 0.0 for k in ("acc_mean", "acc_median", "comp_mean", "comp_median"))
    for d in (0.005, 0.3):  # shifted along the plane normal: every nearest distance is exactly d
        shifted = accuracy_completeness(plane + torch.tensor([0.0, 0.0, d], dtype=torch.float64), plane)
        for key in ("acc_mean", "acc_median", "comp_mean", "comp_median"):
            assert shifted[key] == pytest.approx(d, abs=1e-12), key
    # Subsampling the queries keeps the answer exact.
    sub = accuracy_completeness(plane + torch.tensor([0.0, 0.0, 0.01], dtype=torch.float64), plane, max_points=100)
    assert sub["acc_mean"] == pytest.approx(0.01, abs=1e-12) and sub["comp_median"] == pytest.approx(0.01, abs=1e-12)


def test_accuracy_and_completeness_differ_for_partial_reconstructions() -> None:
    plane = grid_plane(20, 0.1).reshape(-1, 3)  # 1.9 m x 1.9 m
    half = plane[plane[:, 0] < 0.95]
    result = accuracy_completeness(half, plane)
    assert result["acc_mean"] == 0.0  # everything predicted is correct...
    assert result["comp_mean"] > 0.1  # ...but half of the GT is missing


def test_normal_consistency_of_a_plane_with_itself_is_one() -> None:
    g = torch.Generator().manual_seed(5)
    tilted = Sim3(torch.tensor(1.0, dtype=torch.float64), random_rotation(g), torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64))
    plane = tilted.apply(grid_plane(30))
    normals, ok = point_map_normals(plane)
    assert bool(ok.all())
    assert torch.allclose((normals @ tilted.rotation[:, 2]).abs(), torch.ones(30, 30, dtype=torch.float64), atol=1e-12)
    points, n = plane.reshape(-1, 3), normals.reshape(-1, 3)
    result = accuracy_completeness(points, points, pred_normals=n, gt_normals=n)
    assert result["nc_mean"] == pytest.approx(1.0, abs=1e-12) and result["nc_median"] == pytest.approx(1.0, abs=1e-12)
    # Normals lying in the plane are perpendicular: 0 (the metric uses |cos|, so flips give 1).
    side = tilted.rotation[:, 0].expand_as(n)
    assert accuracy_completeness(points, points, pred_normals=n, gt_normals=side)["nc_mean"] == pytest.approx(0.0, abs=1e-12)
    assert accuracy_completeness(points, points, pred_normals=n, gt_normals=-n)["nc_mean"] == pytest.approx(1.0)


def test_normals_ignore_depth_discontinuities_and_invalid_pixels() -> None:
    plane = grid_plane(20)
    plane[:, 10:, 2] = 1.0  # a step: right half is 1 m further away, still parallel
    valid = torch.ones(20, 20, dtype=torch.bool)
    valid[5, 5] = False
    normals, ok = point_map_normals(plane, valid)
    assert not bool(ok[5, 5]) and int(ok.sum()) == 399
    assert torch.allclose(normals[ok][:, 2].abs(), torch.ones(399, dtype=torch.float64), atol=1e-12)


def test_reconstruction_metrics_undo_a_similarity_and_report_the_residual() -> None:
    seq = make_sequence(3, 24, 32, seed=0)
    g = torch.Generator().manual_seed(6)
    world = Sim3(torch.tensor(0.4), random_rotation(g, torch.float32), torch.tensor([1.0, 2.0, -1.0]))
    pred = world.apply(seq.world_points)  # the same geometry in another frame and scale
    result = reconstruction_metrics(pred, seq.world_points, seq.valid)
    assert result["align_scale"] == pytest.approx(2.5, rel=1e-5)
    assert result["acc_mean"] < 1e-5 and result["comp_mean"] < 1e-5
    assert result["nc_mean"] == pytest.approx(1.0, abs=1e-4)


# --------------------------------------------------------------------------- depth


def test_abs_rel_after_median_alignment() -> None:
    g = torch.Generator().manual_seed(7)
    gt = 1.0 + 9.0 * torch.rand(4, 10, 12, generator=g)
    doubled = depth_metrics(2.0 * gt, gt)
    assert doubled["abs_rel"] == pytest.approx(0.0, abs=1e-12) and doubled["delta_1.25"] == 1.0
    assert doubled["depth_scale"] == pytest.approx(0.5)
    raw = depth_metrics(2.0 * gt, gt, align="none")
    assert raw["abs_rel"] == pytest.approx(1.0) and raw["delta_1.25"] == 0.0
    # Known mix: half the pixels 10 % too far, half 50 % too far -> abs rel 0.3, delta 0.5.
    factor = torch.where(torch.arange(gt.numel()).reshape(gt.shape) % 2 == 0, 1.1, 1.5)
    mixed = depth_metrics(gt * factor, gt, align="none")
    assert mixed["abs_rel"] == pytest.approx(0.3, abs=1e-6) and mixed["delta_1.25"] == pytest.approx(0.5)


def test_depth_alignment_per_frame_and_masks() -> None:
    g = torch.Generator().manual_seed(8)
    gt = 1.0 + 9.0 * torch.rand(3, 8, 8, generator=g)
    per_frame_scales = torch.tensor([1.0, 2.0, 4.0])[:, None, None]
    assert depth_metrics(gt * per_frame_scales, gt, align="median_per_frame")["abs_rel"] == pytest.approx(0.0, abs=1e-12)
    assert depth_metrics(gt * per_frame_scales, gt, align="median")["abs_rel"] > 0.2
    # Invalid pixels and GT beyond the 70 m cap are ignored, whatever the prediction says there.
    valid = torch.ones_like(gt, dtype=torch.bool)
    valid[0, 0, :4] = False
    far = gt.clone()
    far[1, 1, :3] = 100.0
    pred = far.clone()
    pred[~valid] = 1e6
    pred[1, 1, :3] = 3.0
    result = depth_metrics(pred, far, valid)
    assert result["abs_rel"] == pytest.approx(0.0, abs=1e-12) and result["num_pixels"] == gt.numel() - 7
    # VGGT-style trailing channel is accepted; empty selections raise.
    assert depth_metrics(gt[..., None], gt)["abs_rel"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="no valid pixels"):
        depth_metrics(gt, gt, torch.zeros_like(valid))


# --------------------------------------------------------------------------- pose


def _trajectory(num: int = 12) -> torch.Tensor:
    angles = torch.linspace(0.0, 1.5, num, dtype=torch.float64)
    rotations = torch.stack([axis_rotation("z", float(a)) @ axis_rotation("x", 0.3 * float(a)) for a in angles])
    centers = torch.stack([angles.cos() * 2.0, angles.sin() * 1.5, 0.2 * angles], dim=-1)
    return extrinsics_from(rotations, centers)


def test_ate_and_rpe_vanish_under_a_similarity_transform() -> None:
    gt = _trajectory()
    g = torch.Generator().manual_seed(9)
    world = Sim3(torch.tensor(0.3, dtype=torch.float64), random_rotation(g), torch.tensor([4.0, -1.0, 2.0], dtype=torch.float64))
    # Map every camera into the new world: world-from-camera poses get R_w R and s R_w c + t.
    rotations = world.rotation @ gt[:, :, :3].transpose(1, 2)
    centers = world.apply(-(gt[:, :, :3].transpose(1, 2) @ gt[:, :, 3:]).squeeze(-1))
    pred = extrinsics_from(rotations, centers)
    metrics = pose_metrics(pred, gt)
    assert metrics["ate_rmse"] < 1e-12 and metrics["rpe_trans"] < 1e-12 and metrics["rpe_rot_deg"] < 1e-9
    assert ate_rmse(pred, gt, align="none") > 1.0  # but not without alignment
    # A pure translation of the trajectory costs exactly its length without alignment.
    shifted = extrinsics_from(gt[:, :, :3].transpose(1, 2), centers_of(gt) + torch.tensor([0.3, 0.0, 0.4], dtype=torch.float64))
    assert ate_rmse(shifted, gt, align="none") == pytest.approx(0.5)


def centers_of(extrinsics: torch.Tensor) -> torch.Tensor:
    return -(extrinsics[:, :, :3].transpose(1, 2) @ extrinsics[:, :, 3:]).squeeze(-1)


def test_rpe_of_known_perturbations() -> None:
    gt = _trajectory()
    # Translation drift: every step is off by v (rotations exact) -> RPE translation = |v|, rotation 0.
    drift = torch.tensor([0.03, 0.0, -0.04], dtype=torch.float64)
    steps = torch.arange(gt.shape[0], dtype=torch.float64)[:, None]
    drifted = extrinsics_from(gt[:, :, :3].transpose(1, 2), centers_of(gt) + steps * drift)
    trans, rot = relative_pose_errors(drifted, gt, align="none")
    assert torch.allclose(trans, torch.full_like(trans, 0.05), atol=1e-12) and float(rot.max()) < 1e-9
    # Rotation: the camera moves along its optical axis and the prediction rolls 2 degrees more per
    # frame around it -> RPE rotation = 2 degrees, translation 0 (with and without Sim(3)).
    num, roll = 10, math.radians(2.0)
    forward_centers = torch.stack([torch.zeros(num), torch.zeros(num), 0.1 * torch.arange(num)], -1).double()
    straight = extrinsics_from(torch.eye(3, dtype=torch.float64).expand(num, 3, 3), forward_centers)
    rolled = extrinsics_from(torch.stack([axis_rotation("z", i * roll) for i in range(num)]), forward_centers)
    for align in ("none", "sim3"):
        metrics = pose_metrics(rolled, straight, align=align)
        assert metrics["rpe_rot_deg"] == pytest.approx(2.0, abs=1e-9)
        assert metrics["rpe_trans"] < 1e-9 and metrics["ate_rmse"] < 1e-9


def test_pair_errors_vanish_under_a_similarity_and_a_mirrored_baseline_costs_nothing() -> None:
    gt = _trajectory()
    world = Sim3(torch.tensor(2.5, dtype=torch.float64), random_rotation(torch.Generator().manual_seed(4)),
                 torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64))
    pred = extrinsics_from(world.rotation @ gt[:, :, :3].transpose(1, 2), world.apply(centers_of(gt)))
    rotation, translation = pair_angle_errors(pred, gt)
    assert rotation.shape == translation.shape == (12 * 11 // 2,)
    assert float(rotation.max()) < 1e-9 and float(translation.max()) < 1e-6
    assert pose_metrics(pred, gt)["pose_auc_30"] == 1.0
    # Every baseline reversed (centres mirrored through the first camera, rotations exact): a
    # direction is scored up to sign, as VGGT does, so this costs nothing either.
    mirrored = extrinsics_from(gt[:, :, :3].transpose(1, 2), 2 * centers_of(gt)[:1] - centers_of(gt))
    rotation, translation = pair_angle_errors(mirrored, gt)
    assert float(rotation.max()) < 1e-9 and float(translation.max()) < 1e-6


def test_pair_errors_of_known_perturbations() -> None:
    # Cameras on a line along x, all looking down +z; the prediction turns camera 3 by 10 degrees
    # about its optical axis and puts camera 5 at a right angle to its true baseline from camera 0.
    num = 6
    centers = torch.stack([torch.arange(num, dtype=torch.float64), torch.zeros(num), torch.zeros(num)], -1)
    eye = torch.eye(3, dtype=torch.float64).expand(num, 3, 3)
    gt = extrinsics_from(eye, centers)
    turned = eye.clone()
    turned[3] = axis_rotation("z", math.radians(10.0))
    moved = centers.clone()
    moved[5] = torch.tensor([0.0, 5.0, 0.0], dtype=torch.float64)
    moved[2] = moved[1]  # no baseline between cameras 1 and 2: no direction predicted
    rotation, translation = pair_angle_errors(extrinsics_from(turned, moved), gt)
    first, second = torch.triu_indices(num, num, offset=1)
    with_3 = (first == 3) | (second == 3)
    assert torch.allclose(rotation[with_3], torch.full_like(rotation[with_3], 10.0), atol=1e-9)
    assert float(rotation[~with_3].max()) < 1e-9
    pair_0_5 = int(((first == 0) & (second == 5)).nonzero())
    assert float(translation[pair_0_5]) == pytest.approx(90.0, abs=1e-9)
    assert float(translation[int(((first == 1) & (second == 2)).nonzero())]) == 90.0
    # Pairs of two unmoved cameras other than 3 keep their baseline's direction exactly.
    untouched = ~with_3 & (first != 5) & (second != 5) & (first != 2) & (second != 2)
    assert float(translation[untouched].max()) < 1e-9


def test_a_camera_back_at_an_earlier_pose_is_scored_on_rotation_alone() -> None:
    gt = _trajectory(8)
    gt[7] = gt[0]  # the loop closes: no baseline between the first and last frame
    rotation, translation = pair_angle_errors(gt, gt)
    assert torch.isfinite(translation).all() and float(translation.max()) < 1e-6 and float(rotation.max()) < 1e-9


def test_pose_auc_matches_the_histogram_definition() -> None:
    # VGGT's calculate_auc_np: a histogram of max(rot, trans) over bins [0, 1), ..., [29, 30], then
    # the mean of its normalised cumulative sum. Computed here independently with numpy.
    g = torch.Generator().manual_seed(2)
    rotation = torch.rand(5000, generator=g, dtype=torch.float64) * 45.0
    translation = torch.rand(5000, generator=g, dtype=torch.float64) * 45.0
    rotation[:3] = torch.tensor([1.0, 29.0, 30.0], dtype=torch.float64)  # on bin edges
    translation[:3] = 0.0
    worst = np.maximum(rotation.numpy(), translation.numpy())
    histogram, _ = np.histogram(worst, bins=np.arange(31))
    expected = float(np.mean(np.cumsum(histogram / worst.size)))
    assert pose_auc(rotation, translation, 30) == pytest.approx(expected, abs=1e-12)
    # A hand count: errors 0.5, 5.5, 29.5 and 40 degrees -> (5 x 1/4 + 24 x 2/4 + 3/4) / 30.
    four = torch.tensor([0.5, 5.5, 29.5, 40.0], dtype=torch.float64)
    assert pose_auc(four, torch.zeros(4, dtype=torch.float64)) == pytest.approx(14.0 / 30.0, abs=1e-12)


def test_long_streams_are_paired_on_evenly_spaced_frames() -> None:
    num = 450
    angles = torch.linspace(0.0, 3.0, num, dtype=torch.float64)
    rotations = torch.stack([axis_rotation("z", float(a)) for a in angles])
    centers = torch.stack([angles.cos(), angles.sin(), torch.zeros(num, dtype=torch.float64)], -1)
    gt = extrinsics_from(rotations, centers)
    rotation, _ = pair_angle_errors(gt, gt)
    assert rotation.shape == (400 * 399 // 2,)
    assert pair_angle_errors(gt, gt, max_frames=10)[0].shape == (45,)
    with pytest.raises(ValueError, match="max_frames"):
        pair_angle_errors(gt, gt, max_frames=1)
    with pytest.raises(ValueError, match="same number of frames"):
        pair_angle_errors(gt, gt[:-1])
    with pytest.raises(ValueError, match="at least 2 frames"):
        pair_angle_errors(gt[:1], gt[:1])


def test_pose_input_validation() -> None:
    gt = _trajectory(5)
    with pytest.raises(ValueError, match="at least 3 frames"):
        ate_rmse(gt[:2], gt[:2])
    with pytest.raises(ValueError, match="align"):
        pose_metrics(gt, gt, align="affine")
    with pytest.raises(ValueError):
        pose_metrics(gt, gt[:4])


# --------------------------------------------------------------------------- evaluate_sequence


def test_evaluate_sequence_against_itself_and_a_vggt_style_prediction() -> None:
    seq = make_sequence(6, 24, 32, trajectory="back_and_forth", seed=3)
    perfect = evaluate_sequence(seq, seq)
    for key in ("acc_mean", "acc_median", "comp_mean", "comp_median", "abs_rel", "ate_rmse", "rpe_trans", "rpe_rot_deg"):
        assert perfect[key] < 1e-6, key
    assert perfect["nc_mean"] == pytest.approx(1.0) and perfect["delta_1.25"] == 1.0

    # A perfect VGGT-like prediction: camera 0 is the world, unknown global scale, batch of one.
    first = to_first_camera_frame(seq)
    scale = 0.37
    pred = {
        "world_points": (first.world_points * scale)[None],
        "depth": (first.depth * scale)[None, ..., None],
        "extrinsics": torch.cat([first.extrinsics[:, :, :3], first.extrinsics[:, :, 3:] * scale], dim=-1)[None],
        "valid": np.ones((6, 24, 32), dtype=bool),
    }
    result = evaluate_sequence(pred, seq)
    assert result["acc_mean"] < 1e-4 and result["comp_mean"] < 1e-4 and result["align_scale"] == pytest.approx(1 / scale, rel=1e-4)
    assert result["abs_rel"] < 1e-6 and result["ate_rmse"] < 1e-5 and result["rpe_rot_deg"] < 1e-3
    # Only the groups present on both sides are scored.
    assert set(evaluate_sequence({"depth": seq.depth}, seq)) == {"abs_rel", "delta_1.25", "depth_scale", "num_pixels"}
    with pytest.raises(ValueError, match="share none"):
        evaluate_sequence({}, seq)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nearest_neighbors_on_cuda_match_cpu() -> None:
    g = torch.Generator().manual_seed(10)
    seq = make_sequence(2, 60, 80, seed=4)
    reference = seq.world_points[seq.valid]
    query = reference[::7] + 0.02 * torch.randn(reference[::7].shape, generator=g)
    d_cpu, _ = nearest_neighbors(query, reference)
    for prune in (False, True):
        d_gpu, _ = nearest_neighbors(query.cuda(), reference.cuda(), prune=prune)
        assert torch.allclose(d_gpu.cpu(), d_cpu, atol=1e-6)
    d_self, i_self = nearest_neighbors(reference.cuda(), reference.cuda(), prune=True)
    assert float(d_self.max()) == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_metrics_run_on_cuda() -> None:
    seq = make_sequence(4, 24, 32, seed=1, device="cuda")
    noisy = {"world_points": seq.world_points + 0.01, "depth": seq.depth * 2.0, "extrinsics": seq.extrinsics}
    gpu = evaluate_sequence(noisy, seq)
    cpu = evaluate_sequence({k: v.cpu() for k, v in noisy.items()}, seq.to("cpu"))
    for key, value in cpu.items():
        assert gpu[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
