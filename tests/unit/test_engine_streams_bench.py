"""benchmarks/engine_streams.py on the CPU with the tiny model: a few frames per stream, and the
JSON it writes has the shape the GPU run's file will have."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("engine_streams_bench", ROOT / "benchmarks" / "engine_streams.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_modes_parse():
    bench = _bench()
    assert [bench.parse_mode(m) for m in ("none", "auto", "8", " Auto ")] == [None, "auto", 8, "auto"]
    for bad in ("0", "-1", "eight", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_mode(bad)


def test_tiny_run_writes_rows_side_by_side(tmp_path):
    out = tmp_path / "engine_streams_cpu.json"
    bench = _bench()
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--height", "28", "--width", "42",
                       "--streams", "1,3", "--modes", "none,2", "--warmup-frames", "4", "--timed-frames", "4",
                       "--warmup-batch", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["run"]["benchmark"] == "engine_streams" and data["run"]["device"] == "cpu"
    assert data["benchmark"] == "engine_streams" and data["image_hw"] == [28, 42] and data["chunk"] == 4
    assert data["cache_config"]["policy"] == "stac"
    assert set(data["modes"]) == {"none", "2"}
    assert data["modes"]["none"]["micro_batch_streams"] is None and data["modes"]["none"]["step_memory_bytes"] is None
    assert data["modes"]["2"]["micro_batch_streams"] == 2 and data["modes"]["2"]["step_memory_bytes"] > 0
    rows = {(r["streams"], r["mode"]): r for r in data["rows"]}
    assert sorted(rows) == [(1, "2"), (1, "none"), (3, "2"), (3, "none")]
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["aggregate_frames_per_second"] > 0 and row["timed_steps"] == 1
        assert row["cache_bytes_per_stream"] > 0 and row["cache_bound_per_stream"] >= row["cache_bytes_per_stream"]
    assert rows[(3, "2")]["micro_batches_per_step"] == 2 and rows[(3, "none")]["micro_batches_per_step"] == 1
    table = {entry["streams"]: entry for entry in data["side_by_side"]}
    assert sorted(table) == [1, 3]
    assert set(table[3]["frames_per_second"]) == {"none", "2"} and table[3]["status"] == {"none": "ok", "2": "ok"}
    assert data["cache_bytes_per_stream"] > 0 and data["cache_bound_per_stream"] > 0
