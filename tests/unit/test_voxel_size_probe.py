"""The voxel-size probe: writes its rows with a run record, and refuses held-out scenes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "voxel_size_probe.py"


@pytest.fixture(scope="module")
def probe():
    return load_script(SCRIPT, "voxel_size_probe")


def test_probe_writes_one_row_per_voxel_size(probe, tmp_path):
    out = tmp_path / "voxel_size_probe_cpu.json"
    assert probe.main(["--frames", "12", "--voxel-sizes", "0.05,0.4", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["run"]["benchmark"] == "voxel_size_probe" and data["seed"] < 1_000_000
    assert [r["voxel_size"] for r in data["rows"]] == [0.05, 0.4]
    for row in data["rows"]:
        assert set(probe.STATS) <= set(row) and row["pooled_tokens"] >= 0


def test_probe_refuses_held_out_scenes(probe, tmp_path):
    with pytest.raises(SystemExit):
        probe.main(["--seed", "1000000", "--out", str(tmp_path / "x.json")])
