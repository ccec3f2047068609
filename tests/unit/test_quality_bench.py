"""benchmarks/quality.py on a few tiny frames: the scene split it scores is recorded with each
sequence's seed, so that checkpoints are compared on validation scenes and reported on held-out ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stac_backend.data import HELD_OUT_SEED, VALIDATION_SEED

from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "quality.py"
TINY_RUN = ["--frames", "6", "--height", "42", "--width", "56", "--sequences", "1", "--policies", "full",
            "--threads", "1", "--point-frame-stride", "3", "--icp-iterations", "1", "--max-points", "200",
            "--icp-max-points", "100", "--icp-max-target-points", "400"]


@pytest.mark.parametrize("scenes,first_seed", [("validation", VALIDATION_SEED), ("held-out", HELD_OUT_SEED)])
def test_the_scored_split_is_recorded(tmp_path, scenes, first_seed):
    bench = load_script(SCRIPT, "quality_bench")
    out = tmp_path / "quality.json"
    name = "quality_validation" if scenes == "validation" else "quality"
    assert bench.main(TINY_RUN + ["--scenes", scenes, "--benchmark", name, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["run"]["benchmark"] == report["benchmark"] == name  # not the held-out file's name
    assert report["scenes"] == scenes and report["sequences"] == 1
    assert [r["seed"] for r in report["runs"]["full"]] == [first_seed]
    assert report["summary"]["full"]["abs_rel"] > 0
    # points scored twice: from the point head and from depth unprojected with the predicted cameras
    from_depth = report["summary"]["full"]["points_from_depth"]
    assert set(from_depth) == {"acc_mean", "comp_mean", "nc_mean", "align_scale"} and from_depth["comp_mean"] > 0


def test_an_unknown_split_is_refused(tmp_path):
    bench = load_script(SCRIPT, "quality_bench")
    with pytest.raises(SystemExit):
        bench.main(TINY_RUN + ["--scenes", "training", "--out", str(tmp_path / "q.json")])
