"""benchmarks/quality_doc.py: the page's sentences follow the numbers, not a fixed story."""

from __future__ import annotations

from pathlib import Path

from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "quality_doc.py"


def summary(comp: dict, ate: dict) -> dict:
    return {name: {"comp_mean": comp[name], "acc_mean": 0.3, "ate_rmse": ate[name]} for name in comp}


def test_policy_spread_ranks_window_and_poses_from_the_numbers(tmp_path):
    doc = load_script(SCRIPT, "quality_doc")
    names = ("full", "window", "sink_window", "heavy_hitter", "stac")
    worst = summary(dict(zip(names, (0.25, 0.69, 0.25, 0.12, 0.12))), dict(zip(names, (0.9, 1.5, 1.1, 1.0, 1.0))))
    text = doc.policy_spread(worst, tmp_path / "missing.json")
    assert "completes worst (0.690 m)" in text and "The full cache keeps the best poses (ATE 0.90 m" in text
    best = summary(dict(zip(names, (1.05, 0.96, 0.97, 1.07, 1.07))), dict(zip(names, (1.4, 1.3, 1.5, 1.6, 1.6))))
    text = doc.policy_spread(best, tmp_path / "missing.json")
    assert "completes best (0.960 m)" in text and "are no better than every bounded policy's (1.30-1.60 m)" in text


def test_validation_table_has_one_row_per_checkpoint():
    doc = load_script(SCRIPT, "quality_doc")

    def run(label, checkpoint, ate):
        per_seed = [{"seed": 2_000_000 + i, "metrics": {"abs_rel": 0.1, "acc_mean": 0.3, "comp_mean": 0.5, "nc_mean": 0.6,
                                                        "ate_rmse": ate + i, "align_scale": 0.7}} for i in range(2)]
        return {"label": label, "checkpoint": checkpoint, "runs": {"full": per_seed}}

    lines = doc.validation_comparison({"runs": [run("current", "a.safetensors", 0.5), run("previous", "b.safetensors", 1.0)]},
                                      "quality_validation_cpu.json")
    assert "seeds 2,000,000 to 2,000,001" in lines[1]
    assert lines[-2] == "| current (a.safetensors) | 0.100 | 0.300 | 0.500 | 0.600 | 1.000 | 0.700 |"
    assert lines[-1].startswith("| previous (b.safetensors) |") and "| 1.500 |" in lines[-1]
    assert doc.validation_comparison({"runs": []}, "x.json") == []


def test_points_two_ways_table_and_verdict():
    doc = load_script(SCRIPT, "quality_doc")

    def policy(acc, comp, nc, depth):
        return {"acc_mean": acc, "comp_mean": comp, "nc_mean": nc,
                "points_from_depth": dict(zip(("acc_mean", "comp_mean", "nc_mean", "align_scale"), depth))}

    s = {"full": policy(0.3, 1.0, 0.5, (0.2, 0.1, 0.6, 0.9)), "stac": policy(0.3, 1.0, 0.5, (0.35, 1.1, 0.4, 0.9))}
    lines = doc.points_two_ways(s)
    assert "| full | 0.300 | 0.200 | 1.000 | 0.100 | 0.500 | 0.600 |" in lines
    assert "| stac | 0.300 | 0.350 | 1.000 | 1.100 | 0.500 | 0.400 |" in lines
    assert lines[-1].startswith("With the full cache, depth + cameras is better on accuracy, completeness, NC")
    assert "better route to a map" in lines[-1]
    s["full"] = policy(0.3, 1.0, 0.5, (0.4, 0.9, 0.4, 0.9))
    assert doc.points_two_ways(s)[-1].startswith("With the full cache, depth + cameras is better on completeness (")
    assert "better route" not in doc.points_two_ways(s)[-1]
    assert doc.points_two_ways({"full": {"acc_mean": 0.3}}) == []


def test_pair_errors_line_reports_the_span_and_only_when_scored():
    doc = load_script(SCRIPT, "quality_doc")
    s = {name: {"pair_rot_deg": rot, "pose_auc_30": auc}
         for name, rot, auc in zip(("full", "window", "sink_window", "heavy_hitter", "stac"),
                                   (20.04, 31.0, 30.0, 28.5, 28.5), (0.31, 0.2, 0.21, 0.25, 0.25))}
    (line,) = doc.pair_errors_line(s)
    assert "a median of 20.0 degrees with the full cache (AUC@30 0.310;" in line
    assert "and 28.5-31.0 degrees with the bounded policies (AUC@30 0.200-0.250)" in line
    del s["stac"]["pose_auc_30"]  # a run from before the pair metrics
    assert doc.pair_errors_line(s) == [] and not doc.has_pairs(s)
