"""benchmarks/pose_diagnosis.py: the trained-on scenes are the last run's pool, and the rotation gain
and error are exact on known trajectories."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from stac_backend.training.train import TRAJECTORIES, pool_seed0

from conftest import load_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "pose_diagnosis.py"


def yaw_trajectory(degrees_per_frame: float, frames: int = 20) -> torch.Tensor:
    """Camera-from-world extrinsics [S, 3, 4] of a camera turning about its y axis in place, 1 m off the origin."""
    out = []
    for i in range(frames):
        a = math.radians(degrees_per_frame * i)
        rotation = torch.tensor([[math.cos(a), 0.0, math.sin(a)], [0.0, 1.0, 0.0], [-math.sin(a), 0.0, math.cos(a)]],
                                dtype=torch.float64)
        centre = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64) + 0.05 * i
        out.append(torch.cat([rotation, -(rotation @ centre)[:, None]], dim=-1))
    return torch.stack(out)


def test_trained_on_scenes_are_the_loop_rows_of_the_last_runs_pool(tmp_path):
    diag = load_script(SCRIPT, "pose_diagnosis")
    record = {"runs": [{"args": {"seed": "3", "pool": "9", "pool_frames": "300"}},
                       {"args": {"seed": "15", "pool": "96", "pool_frames": "300"}, "resumed_from_step": 28850}]}
    path = tmp_path / "training.json"
    path.write_text(json.dumps(record))
    seeds, pool = diag.training_pool_loops(path, 3)
    first = pool_seed0(15, 28850, 96)
    assert pool["first_scene"] == first == 1_500_480
    assert seeds == [first + r for r in (0, 3, 6)]
    assert all(TRAJECTORIES[(s - first) % len(TRAJECTORIES)] == "loop" for s in seeds)


def test_a_camera_head_that_turns_half_as_far_has_gain_one_half():
    diag = load_script(SCRIPT, "pose_diagnosis")
    truth, half = yaw_trajectory(3.0), yaw_trajectory(1.5)
    exact = diag.diagnose(truth.clone(), truth)
    for group in exact["rotation"].values():
        for b in group:
            assert b["gain"] == pytest.approx(1.0) and b["error_deg"] < 1e-6
    under = diag.diagnose(half, truth)
    (lag_4,) = under["rotation"]["lag_4"]  # 12 degrees, in the 10-20 bin
    assert lag_4["true_deg"] == [10.0, 20.0] and lag_4["pairs"] == 16
    assert lag_4["gain"] == pytest.approx(0.5) and lag_4["error_deg"] == pytest.approx(6.0)
    assert under["metrics"]["pair_rot_deg"] > 0 and exact["metrics"]["pose_auc_30"] == 1.0


def test_a_head_that_turns_the_other_way_is_mirrored_and_small_turns_are_not_judged():
    diag = load_script(SCRIPT, "pose_diagnosis")
    truth = yaw_trajectory(3.0, frames=30)  # frame t has turned 3t degrees: frames 7..29 (21-87) are judged
    assert diag.turn_direction(truth.clone(), truth) == {"frames": 23, "wrong_way_fraction": 0.0, "mirrored": False}
    backwards = diag.turn_direction(yaw_trajectory(-2.0, frames=30), truth)
    assert backwards == {"frames": 23, "wrong_way_fraction": 1.0, "mirrored": True}
    # Turning the other way only after 20 frames: 10 of the 23 judged frames are wrong, not mirrored.
    late = torch.cat([truth[:20], yaw_trajectory(-3.0, frames=30)[20:]])
    assert diag.turn_direction(late, truth) == {"frames": 23, "wrong_way_fraction": pytest.approx(10 / 23),
                                                "mirrored": False}
    assert diag.turn_direction(yaw_trajectory(0.5, frames=30), yaw_trajectory(0.5, frames=30))["frames"] == 0
    # Turns of 90 degrees and more are not judged: at 7 degrees a frame, of 40 frames only 3..12 (21-84
    # degrees) and 39 (273 degrees, i.e. 87 the other way round).
    assert diag.turn_direction(yaw_trajectory(-7.0, frames=40), yaw_trajectory(7.0, frames=40)) == {
        "frames": 11, "wrong_way_fraction": 1.0, "mirrored": True}


def test_rotation_vectors_are_axis_times_angle_up_to_half_a_turn():
    diag = load_script(SCRIPT, "pose_diagnosis")
    rotations = yaw_trajectory(30.0, frames=7)[:, :, :3]  # 0 .. 180 degrees about y
    vectors = diag.rotation_vectors(rotations)
    angles = vectors.norm(dim=-1)
    assert torch.allclose(angles, torch.deg2rad(torch.arange(7, dtype=torch.float64) * 30.0), atol=1e-6)
    assert torch.allclose(vectors[1:6, [0, 2]], torch.zeros(5, 2, dtype=torch.float64), atol=1e-9)
    assert (vectors[1:6, 1] * vectors[1, 1] > 0).all()  # one sense of turning throughout


def test_the_mirror_image_turns_the_other_way_and_mirroring_twice_is_the_identity():
    diag = load_script(SCRIPT, "pose_diagnosis")
    truth = yaw_trajectory(3.0, frames=30)
    mirrored = diag.mirrored_left_right(truth)
    assert torch.allclose(diag.mirrored_left_right(mirrored), truth)
    assert torch.allclose(mirrored[..., :3], yaw_trajectory(-3.0, frames=30)[..., :3])
    # The camera centres are mirrored in x: t = -R c, so c = -R^T t.
    centres = -(truth[..., :3].transpose(1, 2) @ truth[..., 3:])[..., 0]
    mirrored_centres = -(mirrored[..., :3].transpose(1, 2) @ mirrored[..., 3:])[..., 0]
    assert torch.allclose(mirrored_centres, centres * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
    assert diag.turn_direction(mirrored, truth)["mirrored"]


def test_pooled_counts_the_loops_whose_direction_does_not_follow_the_image():
    diag = load_script(SCRIPT, "pose_diagnosis")
    truth = yaw_trajectory(3.0, frames=30)
    mirror = diag.mirrored_left_right
    # Predictions as rendered and for the mirrored input: reads the image / ignores it / reads it backwards.
    heads = {"reads the image": (truth, mirror(truth)), "ignores the image": (truth, truth),
             "reads it backwards": (mirror(truth), truth)}
    rows = [diag.add_mirrored_input(diag.diagnose(pred, truth), pred_mirrored, truth)
            for pred, pred_mirrored in heads.values()]
    assert [r["direction_ignores_image"] for r in rows] == [False, True, False]
    direction = diag.pooled(rows)["direction"]
    assert direction["mirrored_loops"] == 1 and direction["mirrored_loops_mirrored_input"] == 2
    assert direction["loops_direction_ignores_image"] == 1
    assert direction["metrics_mirrored"]["pair_rot_deg"] > direction["metrics_not_mirrored"]["pair_rot_deg"]
