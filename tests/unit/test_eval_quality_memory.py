"""The quality-against-memory benchmark spends each budget on the largest setting that fits it."""

from __future__ import annotations

from pathlib import Path

import pytest

from stac_backend.engine import full_cache_bytes_per_frame, stream_memory_bound

from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "quality_memory.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT, "quality_memory")


@pytest.mark.parametrize("policy", ["window", "sink_window", "heavy_hitter", "stac"])
def test_every_policy_fits_its_budget_and_grows_with_it(bench, tiny_model, policy):
    frames, tokens = 400, tiny_model.config.tokens_per_frame(56, 84)
    full = full_cache_bytes_per_frame(tiny_model.config, 56, 84) * frames
    bounds = []
    for fraction in (0.1, 0.25, 0.5):
        config = bench.config_for_budget(policy, int(fraction * full), tiny_model, tokens, 4, frames, {})
        assert config is not None and config.policy == policy
        bound = bench.bound_of(config, tiny_model, tokens)
        # the stream's whole bound (camera trunk included), in the unit of the full cache's bytes
        assert bound == stream_memory_bound(tiny_model.config, config, (56, 84), next(tiny_model.parameters()).dtype)
        assert bound <= fraction * full
        bounds.append(bound)
        if policy == "stac":
            assert config.memory_budget_bytes == int(fraction * full) and config.max_voxels is None
    assert bounds == sorted(bounds) and bounds[-1] > 0.45 * full  # a larger budget is used, not left idle


def test_a_budget_below_the_smallest_setting_does_not_fit(bench, tiny_model):
    tokens = tiny_model.config.tokens_per_frame(56, 84)
    per_frame = full_cache_bytes_per_frame(tiny_model.config, 56, 84)
    for policy in ("window", "stac"):
        assert bench.config_for_budget(policy, 2 * per_frame, tiny_model, tokens, 4, 100, {}) is None
    assert bench.lap_segments(10, 3) == {"lap_2": (10, 20), "lap_3": (20, 30)}


def _report(with_depth_points: bool) -> dict:
    metrics = {"comp_mean": 0.5, "acc_mean": 0.25, "overall": 0.375, "ate_rmse": 1.0, "abs_rel": 0.08}
    if with_depth_points:
        metrics |= {"depth_points_comp_mean": 0.125, "depth_points_acc_mean": 0.375}
    row = {"policy": "stac", "budget_fraction": 0.1, "fits": True, "settings": {"window": 4, "hh": 1}, "bound_bytes": 2**20,
           "peak_bytes": 2**19, "metrics": {"all": metrics, "lap_2": dict(metrics)}}
    return {"full_cache_bytes_at_length": 10 * 2**20, "summary": {"rows": [row]}}


def test_the_table_adds_the_points_from_depth_where_every_run_has_them(bench):
    with_them = bench.table(_report(True)).splitlines()
    assert "comp, depth + cameras (m)" in with_them[0] and "acc, depth + cameras (m)" in with_them[0]
    assert with_them[2].endswith("| 0.125 | 0.375 |")
    without = bench.table(_report(False)).splitlines()  # a file from before they were scored
    assert "depth + cameras" not in without[0] and len(without[0].split("|")) == len(with_them[0].split("|")) - 2


def test_the_ablation_is_stacs_setting_with_nothing_retrieved(bench, tiny_model):
    frames, tokens = 400, tiny_model.config.tokens_per_frame(56, 84)
    budget = int(0.1 * full_cache_bytes_per_frame(tiny_model.config, 56, 84) * frames)
    stac = bench.config_for_budget("stac", budget, tiny_model, tokens, 4, frames, {"voxel_size": 0.2})
    ablation = bench.config_for_budget(bench.ABLATION, budget, tiny_model, tokens, 4, frames, {"voxel_size": 0.2})
    assert ablation == stac.replace(retrieval=0)  # same policy, hot cache, budget and voxels
    assert bench.bound_of(ablation, tiny_model, tokens) <= budget
    assert not any(ablation.retrieves_at(first, 4, step) for step, first in enumerate(range(0, frames, 4), start=1))


def test_a_chosen_stac_hot_cache_gets_the_rest_of_the_budget_in_its_pool(bench, tiny_model):
    frames, tokens = 400, tiny_model.config.tokens_per_frame(56, 84)
    budget = int(0.25 * full_cache_bytes_per_frame(tiny_model.config, 56, 84) * frames)
    config = bench.config_for_budget("stac:4/8/2", budget, tiny_model, tokens, 4, frames, {})
    assert (config.policy, config.window, config.hh, config.retrieval) == ("stac", 4, 8, 2)
    assert config.memory_budget_bytes == budget and bench.bound_of(config, tiny_model, tokens) <= budget
    assert bench.config_for_budget(f"stac:4/{frames}/2", budget, tiny_model, tokens, 4, frames, {}) is None  # too big


def test_the_true_geometry_ablation_pools_tokens_at_the_ground_truth_points(bench, tiny_model):
    """stac's setting; its cache's token positions are the ground truth's, while the outputs stay the
    model's own (before anything is retrieved they equal plain stac's)."""
    import torch

    from stac_backend.cache.stac import patch_positions
    from stac_backend.engine import Stream

    frames, tokens = 400, tiny_model.config.tokens_per_frame(56, 84)
    budget = int(0.1 * full_cache_bytes_per_frame(tiny_model.config, 56, 84) * frames)
    config = bench.config_for_budget(bench.TRUE_GEOMETRY, budget, tiny_model, tokens, 4, frames, {"conf_threshold": 2.0})
    assert config is not None and config.policy == "stac" and config.retrieval > 0
    assert config == bench.config_for_budget("stac", budget, tiny_model, tokens, 4, frames, {"conf_threshold": 2.0})
    seq = bench.revisit_loop(8, 2, 56, 84, seed=1_000_000)
    plain, swapped = Stream(tiny_model, cache=config), Stream(tiny_model, cache=config)
    bench.use_true_geometry(seq)(swapped)
    with torch.inference_mode():
        want, got = plain.push(seq.images[:4]), swapped.push(seq.images[:4])
    for key in ("depth", "world_points", "pose_enc"):
        assert torch.equal(want[key], got[key])
    frame, position = next(iter(swapped.cache.layers.values())).head_tokens(0)
    truth = torch.where(seq.valid[:4, ..., None], seq.world_points[:4].float(), torch.tensor(float("nan")))
    psi = tiny_model.config.patch_start_idx
    expected = patch_positions(truth, torch.full(truth.shape[:-1], 1e6), (14, 14), config.conf_threshold)
    patches = position.reshape(-1, tokens, 3)[:, psi:]  # the step's 4 frames, in order
    assert frame.reshape(-1, tokens)[:, 0].tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(patches, expected, equal_nan=True)
    model_points = next(iter(plain.cache.layers.values())).head_tokens(0)[1].reshape(-1, tokens, 3)[:, psi:]
    assert not torch.allclose(model_points.nan_to_num(), patches.nan_to_num())  # the swap changed something


def test_the_summary_adds_overall_the_mean_of_accuracy_and_completeness(bench):
    def run(acc, comp):
        scores = {"acc_mean": acc, "comp_mean": comp, "ate_rmse": 1.0}
        return {"policy": "stac", "budget_fraction": 0.1, "fits": True, "settings": {}, "cache_bytes_bound": 1,
                "peak_cache_bytes": 1, "metrics": {"all": scores, "lap_2": dict(scores)}}

    report = {"sequences": [{"seed": 1, "runs": [run(0.25, 0.75)]}, {"seed": 2, "runs": [run(0.5, 1.5)]}]}
    (row,) = bench.summarize(report)["rows"]
    assert row["metrics"]["all"] == {"acc_mean": 0.375, "comp_mean": 1.125, "ate_rmse": 1.0, "overall": 0.75}
    assert row["metrics"]["lap_2"]["overall"] == 0.75
    assert "overall" not in report["sequences"][0]["runs"][0]["metrics"]["all"]  # the runs as measured stay as they are


def test_the_scene_comparison_gives_each_scenes_change_against_its_own_full_cache(bench):
    def run(policy, fraction, acc, comp, ate, lap_ate):
        return {"policy": policy, "budget_fraction": fraction, "fits": True, "settings": {}, "cache_bytes_bound": 1,
                "peak_cache_bytes": 1, "metrics": {"all": {"acc_mean": acc, "comp_mean": comp, "ate_rmse": ate},
                                                   "lap_2": {"acc_mean": acc, "comp_mean": comp, "ate_rmse": lap_ate}}}

    scenes = [
        [run("full", None, 1.0, 1.0, 1.0, 1.0), run("stac", 0.1, 1.04, 0.5, 1.0, 0.5), run("window", 0.1, 2.0, 2.0, 2.0, 0.25)],
        [run("full", None, 2.0, 2.0, 2.0, 2.0), run("stac", 0.1, 3.0, 2.0, 2.0, 2.0), run("window", 0.1, 2.0, 4.0, 2.0, 4.0)],
    ]
    report = {"sequences": [{"seed": i, "runs": runs} for i, runs in enumerate(scenes)]}
    compared = bench.compare_scenes(report)
    stac = compared["change_against_full"]["stac @ 0.1"]
    assert stac["acc_mean"] == pytest.approx([0.04, 0.5]) and stac["comp_mean"] == pytest.approx([-0.5, 0.0])
    assert stac["overall"] == pytest.approx([-0.23, 0.25]) and stac["ate_rmse"] == [0.0, 0.0]
    assert (stac["within_5pct"], stac["scenes"]) == (1, 2)  # the first scene only (the second is 50% less accurate)
    assert compared["best_on_revisit_lap"] == {"0.1": {"overall": {"stac": 2}, "ate_rmse": {"window": 1, "stac": 1}}}


def test_overall_of_the_points_from_depth_where_they_were_scored(bench):
    scores = {"acc_mean": 0.25, "comp_mean": 0.75, "depth_points_acc_mean": 0.5, "depth_points_comp_mean": 1.5}
    assert bench.with_overall(scores)["depth_points_overall"] == 1.0
    assert "depth_points_overall" not in bench.with_overall({"acc_mean": 0.25, "comp_mean": 0.75})
