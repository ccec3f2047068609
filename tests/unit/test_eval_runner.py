"""``stac eval`` end to end: scoring with segments, streaming every policy, the report files."""

from __future__ import annotations

import json

import pytest
import torch

from stac_backend.cli import main
from stac_backend.data import make_sequence, write_sequence
from stac_backend.evaluation import MetricSettings, policy_configs, score_prediction
from stac_backend.evaluation.synthetic import lap_segments, revisit_loop

FAST = MetricSettings(icp_iterations=2, max_points=1000, icp_max_points=500, icp_max_target_points=2000)


@pytest.fixture(scope="module")
def loop():
    return revisit_loop(lap_frames=4, laps=2, height=28, width=42, seed=7)


def _gt(seq):
    return {"depth": seq.depth, "valid": seq.valid, "world_points": seq.world_points, "extrinsics": seq.extrinsics}


def test_revisit_loop_passes_the_same_places_with_new_views(loop):
    centers = -(loop.extrinsics[:, :3, :3].transpose(1, 2) @ loop.extrinsics[:, :3, 3:])[..., 0]
    first, second = centers[:4], centers[4:]
    step = (first[1:] - first[:-1]).norm(dim=-1).mean()
    assert not torch.equal(loop.images[:4], loop.images[4:])  # no frame repeats
    assert ((second - first).norm(dim=-1) < step).all()  # half a step apart: the same places
    assert lap_segments(4, 2) == {"lap_2": (4, 8)}


def test_perfect_prediction_scores_zero_everywhere(loop):
    # Any similarity of the truth is perfect: scale 2 and a shift.
    gt = _gt(loop)
    pred = {"depth": 2 * loop.depth, "world_points": 2 * loop.world_points + 1.0,
            "extrinsics": torch.cat([loop.extrinsics[:, :, :3], 2 * loop.extrinsics[:, :, 3:]], -1),
            "intrinsics": loop.intrinsics}
    pred["extrinsics"][:, :, 3] -= (pred["extrinsics"][:, :, :3] @ torch.ones(3))  # centres shifted by +1 as well
    scores = score_prediction(pred, gt, FAST, lap_segments(4, 2))
    assert scores["all"]["depth_points_align_scale"] == pytest.approx(0.5, rel=1e-4)  # depth + cameras: the same similarity
    for segment in ("all", "lap_2"):
        for key in ("acc_mean", "comp_mean", "abs_rel", "ate_rmse", "depth_points_acc_mean", "depth_points_comp_mean"):
            assert scores[segment][key] == pytest.approx(0.0, abs=1e-4), (segment, key)
    assert scores["all"]["rpe_rot_deg"] == pytest.approx(0.0, abs=1e-3)


def test_a_drifted_second_lap_is_charged_to_the_second_lap(loop):
    gt = _gt(loop)
    shift = torch.tensor([0.5, 0.0, 0.0])
    points = loop.world_points.clone()
    points[4:] += shift
    extrinsics = loop.extrinsics.clone()
    extrinsics[4:, :, 3] -= extrinsics[4:, :, :3] @ shift  # second-lap cameras moved with their points
    scores = score_prediction({"depth": loop.depth, "world_points": points, "extrinsics": extrinsics}, gt, FAST,
                              {"lap_1": (0, 4), "lap_2": (4, 8)})
    assert scores["lap_2"]["ate_rmse"] > 0.1 and scores["lap_1"]["ate_rmse"] > 0.1  # one alignment splits the drift
    assert scores["lap_2"]["abs_rel"] == pytest.approx(0.0, abs=1e-6)  # depth is per frame: unaffected


def test_policy_configs_defaults_and_errors():
    configs = policy_configs(None, chunk=2, overrides={"stac": {"conf_threshold": 1.0}})
    assert list(configs) == ["full", "window", "sink_window", "heavy_hitter", "stac"]
    assert configs["window"].window == 8 and configs["stac"].conf_threshold == 1.0 and configs["full"].chunk == 2
    with pytest.raises(ValueError, match="unknown cache policies"):
        policy_configs(["full", "lru"])


def test_stac_eval_on_a_synth_folder_writes_json_markdown_and_plot(tmp_path, capsys):
    write_sequence(make_sequence(4, 42, 56, seed=11), tmp_path / "scene")
    out = tmp_path / "eval"
    assert main(["eval", str(tmp_path / "scene"), "--out", str(out), "--preset", "tiny", "--device", "cpu",
                 "--policies", "full,sink_window", "--size", "56", "--stride", "1", "--icp-iterations", "2",
                 "--max-points", "500", "--chunk-size", "2", "--policy-overrides", '{"sink_window": {"window": 2}}']) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["provenance"]["commit"] and results["provenance"]["command"]
    (sequence,) = results["sequences"]
    assert sequence["frames"] == 4 and set(sequence["policies"]) == {"full", "sink_window"}
    full = sequence["policies"]["full"]
    assert full["cache_bytes_bound"] is None and full["peak_cache_bytes"] > 0
    assert sequence["policies"]["sink_window"]["cache_bytes_bound"] > 0
    assert {"acc_mean", "comp_mean", "nc_mean", "abs_rel", "delta_1.25", "ate_rmse", "rpe_rot_deg",
            "depth_points_acc_mean", "depth_points_comp_mean", "depth_points_nc_mean"} <= set(full["metrics"]["all"])
    table = (out / "results.md").read_text()
    assert "| full |" in table and "| sink_window |" in table and "Abs Rel" in table and "depth + cameras" in table
    assert "| full |" in capsys.readouterr().out


def test_stac_eval_errors_are_clear(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--preset", "tiny"]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--out", str(tmp_path / "o"), "--preset", "tiny", "--policies", "lru"]) == 2
    assert "unknown cache policies" in capsys.readouterr().err
