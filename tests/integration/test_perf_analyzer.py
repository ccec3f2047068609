"""perf_analyzer for the stac model: --input-data with real frames, CSV parsing, and a smoke sweep.

The smoke test runs the genuine perf_analyzer (tritonclient 2.50.0 wheel, installed by
``stac perf install``; .ci/run does it) in sequence mode (serial sequences, concurrency 1 and 2,
a few seconds of measurement) against a real tritonserver with the tiny model, and requires zero
errors on both sides: perf_analyzer's exit code and the server's own failure counters.
"""

from __future__ import annotations

import base64
import importlib.util
import json

import numpy as np
import pytest

from stac_backend.loadgen.fleet import make_frames
from stac_backend.loadgen.perf import PERF_RESTRICTED, SweepConfig, find_perf_analyzer, make_input_data, parse_csv, run_sweep

CSV = """Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency
1,11.3257,15,199,2126,57,82301,1152,7,73114,123188,128338,132551
2,11.492,13,226,2213,91,167937,1844,6,179790,235558,241994,503538
"""


def test_input_data_holds_real_frames_of_each_stream():
    data = make_input_data(streams=3, steps=2, chunk=4, height=28, width=42, seed=5)
    assert len(data["data"]) == 3 and all(len(stream) == 2 for stream in data["data"])
    step = data["data"][1][1]["FRAMES"]
    assert step["shape"] == [4, 3, 28, 42]  # perf_analyzer adds the batch dimension of 1
    frames = np.frombuffer(base64.b64decode(step["b64"]), np.uint8).reshape(step["shape"])
    np.testing.assert_array_equal(frames, make_frames(6, 8, 28, 42)[4:8])  # stream 1 = seed 5 + 1, frames 4..7
    content = make_input_data(streams=1, steps=1, chunk=2, height=14, width=14, source="random", encoding="content")
    assert len(content["data"][0][0]["FRAMES"]["content"]) == 2 * 3 * 14 * 14
    json.dumps(data)


def test_csv_parsing_and_command():
    rows = parse_csv(CSV, frames_per_request=4)
    assert [r["concurrency"] for r in rows] == [1, 2]
    assert rows[1]["frames_per_second"] == pytest.approx(4 * 11.492, abs=1e-3)
    assert rows[0]["latency_ms"]["p99"] == pytest.approx(132.551)
    assert rows[1]["server_compute_infer_ms"] == pytest.approx(167.937)
    cmd = SweepConfig(concurrency=(1, 4, 1), sequence_length=6).command("pa", "in.json", "out.csv")
    joined = " ".join(cmd)
    assert "--concurrency-range 1:4:1" in joined and "--serial-sequences" in cmd and "-i grpc" in joined
    assert "--sequence-id-range 1000000:1000064" in joined and "--sequence-length 6" in joined
    assert "--streaming" not in cmd and "--streaming" in SweepConfig(streaming=True).command("pa", "in.json", "out.csv")
    with pytest.raises(ValueError, match="sequence_id_range"):
        SweepConfig(concurrency=(1, 40, 1), sequence_id_range=(1, 50)).command("pa", "in.json", "out.csv")


def _analyzer_or_skip():
    pa = find_perf_analyzer()
    if pa is None:
        pytest.skip("perf_analyzer is not installed: `stac perf install` (and apt-get install libb64-0d); .ci/run does both")
    missing = pa.missing_libraries()
    if missing:
        pytest.skip(f"perf_analyzer cannot load {missing}: apt-get install libb64-0d / stac perf install")
    return pa


@pytest.mark.skipif(importlib.util.find_spec("pytriton") is None, reason="serving extras not installed")
@pytest.mark.parametrize("decoupled", [False, True], ids=["unary", "decoupled"])
def test_perf_analyzer_smoke_sweep_has_zero_errors(tmp_path, decoupled):
    """perf_analyzer in sequence mode against the stac model; a decoupled server is found and streamed to."""
    analyzer = _analyzer_or_skip()
    from stac_backend.loadgen.fleet import start_local_server

    server = start_local_server(tmp_path / "server", max_streams=16, threads=1, cache_config={"policy": "stac", "chunk": 4},
                                decoupled=decoupled, stream_keys=False,
                                restricted_protocols=PERF_RESTRICTED)
    try:
        config = SweepConfig(url=server.grpc_url, metrics_url=server.metrics_url, streams=2, steps=4, chunk=4, height=56,
                             width=84, concurrency=(1, 2, 1), sequence_id_range=(1000, 1064), measurement_mode="count_windows",
                             measurement_request_count=8, stability_percentage=100, max_trials=4, timeout_s=240)
        summary = run_sweep(config, tmp_path / "perf_smoke", analyzer=analyzer, log=lambda _: None)
    finally:
        server.stop()
    assert config.streaming == decoupled and ("--streaming" in summary["command"]) == decoupled
    assert summary["returncode"] == 0, "\n".join(summary["output_tail"])
    assert summary["server_errors"] == 0 and summary["passed"], summary
    assert [r["concurrency"] for r in summary["rows"]] == [1, 2]
    assert all(r["requests_per_second"] > 0 and r["latency_ms"]["p99"] > 0 for r in summary["rows"])
    delta = summary["server_metrics_delta"]
    assert delta["stac_frames_total"] > 0 and delta["stac_streams_started_total"] >= 2
    assert (tmp_path / "perf_smoke.csv").is_file() and json.loads((tmp_path / "perf_smoke.json").read_text())["passed"]
