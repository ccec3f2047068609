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
