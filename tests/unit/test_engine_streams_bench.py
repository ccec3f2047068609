"""benchmarks/engine_streams.py on the CPU with the tiny model: a few frames per stream, and the
JSON it writes has the shape the GPU run's file will have."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from conftest import load_script

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    return load_script(ROOT / "benchmarks" / "engine_streams.py", "engine_streams_bench")


def test_modes_parse():
    bench = _bench()
    assert [bench.parse_mode(m) for m in ("none", "auto", "8", " Auto ")] == [None, "auto", 8, "auto"]
    for bad in ("0", "-1", "eight", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_mode(bad)


def test_tiny_run_writes_rows_side_by_side(tmp_path, monkeypatch):
    out = tmp_path / "engine_streams_cpu.json"
    bench = _bench()
    # A CPU has no free-memory figure; pretend the last row would not fit, to see it skipped.
    free = iter([1 << 40] * 3 + [1])  # one figure per row, in row order
    monkeypatch.setattr(bench, "free_bytes", lambda device: next(free))
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
    skipped = rows.pop((3, "2"))
    # predicted from what a stream held in the earlier rows (not its bound) and the measured step memory
    assert skipped["predicted_peak_bytes"] == 3 * rows[(1, "none")]["cache_bytes_per_stream"] + skipped["step_memory_bytes"]
    assert skipped["status"].startswith("skipped: predicted peak") and "exceeds the free" in skipped["status"]
    assert skipped["micro_batches_per_step"] == 2 and "aggregate_frames_per_second" not in skipped
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["aggregate_frames_per_second"] > 0 and row["timed_steps"] == 1
        assert row["cache_bytes_per_stream"] > 0 and row["cache_bound_per_stream"] >= row["cache_bytes_per_stream"]
    assert rows[(3, "none")]["micro_batches_per_step"] == 1
    table = {entry["streams"]: entry for entry in data["side_by_side"]}
    assert sorted(table) == [1, 3]
    assert set(table[1]["frames_per_second"]) == {"none", "2"} and table[1]["status"] == {"none": "ok", "2": "ok"}
    assert table[3]["frames_per_second"]["2"] is None and table[3]["status"]["2"] == skipped["status"]
    assert data["cache_bytes_per_stream"] > 0 and data["cache_bound_per_stream"] > 0


def test_an_out_of_memory_ends_its_row_only(tiny_model, monkeypatch):
    bench = _bench()
    runtime = bench.TorchRuntime(tiny_model, bench.CacheConfig(policy="stac"), max_batch_streams=None)
    steps = []

    def step(streams, images):
        steps.append(len(streams))
        if len(steps) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return []

    monkeypatch.setattr(runtime, "step", step)
    args = argparse.Namespace(height=28, width=42, warmup_frames=4, timed_frames=8, no_skip=False)
    frames = torch.zeros(16, 3, 28, 42, dtype=torch.uint8)
    row = bench.run_row(runtime, 2, frames, args, torch.device("cpu"), None)
    assert row["status"] == "out of memory at step 1 (frame 4 of each stream)"
    assert steps == [2, 2] and "aggregate_frames_per_second" not in row
