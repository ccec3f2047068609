"""The Triton part of benchmarks/engine_step.py against a real local tritonserver (tiny model, CPU):
one stream through the decoupled model with the fleet client, and the row it records."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parents[2]
SERVING = importlib.util.find_spec("pytriton") is not None and importlib.util.find_spec("tritonclient") is not None


def _bench():
    return load_script(ROOT / "benchmarks" / "engine_step.py", "engine_step_bench")


@pytest.mark.skipif(not SERVING, reason="serving extras not installed (pip install -e '.[serving]')")
def test_triton_phase_serves_a_stream(tmp_path):
    bench = _bench()
    assert bench.triton_unavailable() is None
    part = tmp_path / "triton.json"
    assert bench.main(["--phase", "triton", "--variant", "baseline", "--deadline-s", "300", "--part-out", str(part),
                       "--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--height", "28", "--width", "42",
                       "--triton-streams", "1", "--triton-frames", "8"]) == 0
    (row,) = json.loads(part.read_text())["rows"]
    assert row["streams"] == 1 and row["max_batch_size"] == 1 and row["status"] == "ok", row
    assert row["frames"] == 8 and row["frames_per_second"] > 0 and row["server_start_seconds"] > 0
