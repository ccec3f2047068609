"""The fleet client against a real local tritonserver (tiny model, CPU), plus its pure parts.

- paced and unpaced fleets finish with zero errors, correct per-stream numbers and a JSON result;
- an unreachable server restarts each stream up to ``max_restarts`` and then reports the error;
- a stream the server no longer knows (here: ended behind the fleet's back) restarts with START;
- pipelined streams (``inflight > 1``, one bidirectional gRPC stream each) give the same outputs as
  lockstep ones, finish partial last chunks, keep the camera rate when paced, leave no task behind,
  and a failed request ends only its own stream;
- error classification, frame generation, config validation, the nginx renderer's refusals.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json

import numpy as np
import pytest

from stac_backend.loadgen.fleet import (
    FleetConfig,
    classify_error,
    make_frames,
    percentiles,
    run_fleet,
    run_fleet_async,
)
from stac_backend.tools.nginx import NginxConfig, render_nginx_config

from conftest import load_script

SERVING = importlib.util.find_spec("pytriton") is not None and importlib.util.find_spec("tritonclient") is not None


def test_classify_error():
    assert classify_error("StatusCode.UNAVAILABLE", "Received http2 header with status: 502") == "unavailable"
    assert classify_error("StatusCode.UNAVAILABLE", "failed to connect to all addresses") == "unavailable"
    assert classify_error("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded") == "timeout"
    assert classify_error("StatusCode.INVALID_ARGUMENT",
                          "inference request for sequence 7 to model 'stac' must specify the START flag on the first "
                          "request of the sequence") == "unknown_stream"
    assert classify_error("StatusCode.INTERNAL", "unknown stream 7: the first request of a stream must carry") == "unknown_stream"
    assert classify_error("StatusCode.INTERNAL", "server is at its limit of 4 streams; retry later") == "error"
    assert classify_error("StatusCode.INTERNAL", "bad FRAMES: oversized") == "error"


def test_make_frames_synthetic_ping_pong_and_random():
    f = make_frames(3, 10, 28, 42, "synthetic", scene_frames=4)
    assert f.shape == (10, 3, 28, 42) and f.dtype == np.uint8
    # 4 rendered frames played 0 1 2 3 2 1 0 1 2 3
    for a, b in ((1, 5), (2, 4), (0, 6), (3, 9)):
        np.testing.assert_array_equal(f[a], f[b])
    assert not np.array_equal(f[0], f[1])
    assert not np.array_equal(make_frames(3, 2, 28, 42, "synthetic"), make_frames(4, 2, 28, 42, "synthetic"))
    r = make_frames(1, 3, 14, 14, "random")
    assert r.shape == (3, 3, 14, 14) and r.dtype == np.uint8
    with pytest.raises(ValueError):
        make_frames(1, 3, 14, 14, "camera")


def test_config_validation_and_percentiles():
    with pytest.raises(ValueError, match="multiples of 14"):
        FleetConfig(height=50).validate()
    with pytest.raises(ValueError, match="distinct"):
        FleetConfig(streams=2, stream_ids=[3, 3]).validate()
    with pytest.raises(ValueError, match="fps"):
        FleetConfig(fps=0).validate()
    with pytest.raises(ValueError, match="inflight"):
        FleetConfig(inflight=0).validate()
    FleetConfig(inflight=4).validate()  # restarts stay at their default: pipelined streams just do not use them
    assert FleetConfig(streams=3, first_stream_id=10).ids() == [10, 11, 12]
    p = percentiles(list(range(1, 101)))
    assert p["p50"] == 50.5 and p["p99"] == 99.01 and p["max"] == 100
    assert percentiles([]) == {}


def test_nginx_renderer_refuses_nonsense():
    with pytest.raises(ValueError):
        render_nginx_config(NginxConfig(upstreams=[]))
    with pytest.raises(ValueError):
        render_nginx_config(NginxConfig(upstreams=["a:1"], plaintext=False))
    text = render_nginx_config(NginxConfig(upstreams=["a:1", "b:2"], tls_listen="8443"))
    # two listeners (h2c and TLS), each with a unary, a streaming and a health/metadata location
    assert text.count("grpc_pass grpc://triton_grpc;") == 6 and "hash $stac_route_key consistent;" in text
    assert "map $http_x_stream_id $stac_route_key {" in text  # the header, or the connection without one
    assert text.count("location = /inference.GRPCInferenceService/ModelStreamInfer {") == 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not SERVING:
        pytest.skip("serving extras not installed (pip install -e '.[serving]')")
    from stac_backend.loadgen.fleet import start_local_server

    srv = start_local_server(tmp_path_factory.mktemp("fleet"), max_streams=8, threads=1,
                             cache_config={"policy": "stac", "chunk": 4})
    yield srv
    srv.stop()


def test_unpaced_fleet_against_a_real_server(server, tmp_path):
    config = FleetConfig(url=server.grpc_url, streams=3, frames=10, chunk=4, height=28, width=42, source="random",
                         progress=False, metrics_urls=[server.metrics_url], keep_outputs=True)
    result = run_fleet(config)
    agg = result.aggregate()
    assert agg["errors"] == 0 and agg["restarts"] == 0 and agg["index_breaks"] == 0
    assert agg["frames"] == 30 and agg["requests"] == 9 and agg["streams_completed"] == 3
    assert set(agg["latency_ms"]) >= {"p50", "p90", "p99"} and agg["frames_per_second"] > 0
    for r in result.streams:
        assert [int(x) for c in r.outputs for x in c["frame_index"]] == list(range(10))  # 4 + 4 + 2
        assert r.outputs[-1]["depth"].shape == (2, 28, 42)
    delta = result.server_metrics[server.metrics_url]
    assert delta["stac_frames_total"] == 30 and delta["stac_streams_started_total"] == 3
    assert delta["stac_streams_ended_total"] == 3
    data = json.loads(json.dumps(result.to_json()))  # JSON-serialisable as written by --out
    assert data["kind"] == "fleet" and len(data["streams"]) == 3 and data["aggregate"]["errors"] == 0
    assert "all" in result.table()


def test_paced_fleet_keeps_camera_rate(server):
    config = FleetConfig(url=server.grpc_url, streams=2, frames=8, chunk=4, height=28, width=42, fps=8.0,
                         source="random", progress=False, first_stream_id=50)
    result = run_fleet(config)
    agg = result.aggregate()
    assert agg["errors"] == 0 and agg["frames"] == 16
    # 8 frames at 8 fps: the last chunk cannot leave before t = 1 s after the stream's start.
    assert all(r.finished_s - r.started_s >= 0.95 for r in result.streams)
    assert set(agg["e2e_latency_ms"]) >= {"p50", "p99"}


def test_unreachable_server_restarts_then_errors():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = FleetConfig(url=f"127.0.0.1:{port}", streams=2, frames=4, chunk=4, height=14, width=14, source="random",
                         progress=False, max_restarts=2, restart_backoff_s=0.01, request_timeout_s=5)
    result = run_fleet(config)
    for r in result.streams:
        assert r.restarts == 2 and len(r.errors) == 1 and not r.completed
        assert "unavailable" in r.errors[0] and all("unavailable" in x for x in r.restart_reasons)


def test_stream_unknown_to_the_server_restarts_with_start(server):
    """The stream is ended behind the fleet's back (as if its replica had been replaced)."""
    from stac_backend.client import StacClient

    sid = 77
    frames = {sid: make_frames(0, 12, 28, 42, "random")}

    def end_it(record, _out):
        if record.frames_done == 4 and record.restarts == 0:
            c = StacClient(server.grpc_url)
            c._keys[sid] = record.key  # the stream's owner (an operator) may restart it: START+END frees it
            c.send_chunk(sid, frames[sid][:4], start=True, end=True)
            c.close()

    result = run_fleet(FleetConfig(url=server.grpc_url, streams=1, stream_ids=[sid], frames=12, chunk=4, height=28,
                                   width=42, progress=False, keep_outputs=True, restart_backoff_s=0.01),
                       frames=frames, on_chunk=end_it)
    r = result.streams[0]
    assert r.completed and r.restarts == 1 and r.errors == [] and r.segments == [0, 4]
    assert "unknown_stream" in r.restart_reasons[0]
    assert [c["frame_index"].tolist() for c in r.outputs] == [[0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7]]


def _capacity_table_module():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "fleet_capacity_table.py"
    return load_script(path, "fleet_capacity_table")


def _capacity_file(device, preset, budgets):
    return {"kind": "fleet_capacity", "device": device, "preset": preset, "dtype": "float32", "frame_size": [56, 84],
            "fps_per_stream": 10.0, "environment": {"cpus": 2},
            "budgets": [{"budget": b, "stream_bound_bytes": 1 << 20, "streams_sustained": n,
                         "points": [{"streams": n, "sustained": False, "frames_per_second": 10.0 * n,
                                     "e2e_latency_ms": {"p99": 321.0}}]}
                        for b, n in budgets]}


def test_capacity_table_uses_measurements_only_and_marks_unmeasured_gpu_rows(tmp_path):
    table = _capacity_table_module()
    (tmp_path / "fleet_capacity_cpu.json").write_text(json.dumps(_capacity_file("cpu", "tiny", [("window", 5), ("stac", 3)])))
    (tmp_path / "unrelated.json").write_text(json.dumps({"something": 1}))
    text = table.build(tmp_path)
    assert "| window | 1.0 MiB | **5** at 10 fps | 50.0 | 321 | `fleet_capacity_cpu.json` |" in text
    gpu_lines = [line for line in text.splitlines() if line.endswith("| not measured |")]
    assert len(gpu_lines) == len(table.GPU_BUDGETS)  # no GPU file: every GPU row says so, none invented
    (tmp_path / "fleet_capacity_gpu.json").write_text(json.dumps(_capacity_file("cuda", "vggt-1b", [("stac", 12)])))
    text = table.build(tmp_path)
    assert "**12** at 10 fps (`fleet_capacity_gpu.json`)" in text
    assert len([line for line in text.splitlines() if line.endswith("| not measured |")]) == len(table.GPU_BUDGETS) - 1
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{table.BEGIN}\nold\n{table.END}\noutro\n")
    table.write_into(doc, text)
    assert doc.read_text().startswith("intro\n" + table.BEGIN) and doc.read_text().endswith(table.END + "\noutro\n")
    assert "\nold\n" not in doc.read_text()


def _random_frames(ids: list[int], frames: int, height: int = 28, width: int = 42) -> dict[int, np.ndarray]:
    return {sid: make_frames(k, frames, height, width, "random") for k, sid in enumerate(ids)}


def test_pipelined_fleet_gives_the_lockstep_outputs(server):
    """inflight=2 and inflight=1 on the same frames: same per-chunk DEPTH and WORLD_POINTS."""
    runs = {}
    for inflight, ids in ((1, [101, 102, 103]), (2, [111, 112, 113])):
        frames = dict(zip(ids, _random_frames(ids, 10).values()))  # the same pixels under each run's ids
        config = FleetConfig(url=server.grpc_url, streams=3, stream_ids=ids, frames=10, chunk=4, height=28, width=42,
                             progress=False, keep_outputs=True, inflight=inflight)
        runs[inflight] = run_fleet(config, frames=frames)
    for result in runs.values():
        agg = result.aggregate()
        assert agg["errors"] == 0 and agg["index_breaks"] == 0 and agg["streams_completed"] == 3
        assert agg["frames"] == 30 and agg["requests"] == 9
    for lockstep, pipelined in zip(runs[1].streams, runs[2].streams):
        assert [c["first_frame"] for c in pipelined.outputs] == [0, 4, 8]
        for a, b in zip(lockstep.outputs, pipelined.outputs):
            # Triton may batch the streams differently in the two runs: float32 rounding only.
            np.testing.assert_allclose(b["depth"], a["depth"], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(b["world_points"], a["world_points"], rtol=1e-5, atol=1e-5)


def test_pipelined_streams_finish_partial_chunks_and_leave_nothing_running(server):
    config = FleetConfig(url=server.grpc_url, streams=3, first_stream_id=130, frames=10, chunk=4, height=28, width=42,
                         source="random", progress=False, keep_outputs=True, inflight=3, metrics_urls=[server.metrics_url])

    async def run_and_look_around():
        result = await run_fleet_async(config)
        await asyncio.sleep(0.05)  # let gRPC's own callbacks settle
        return result, [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    result, pending = asyncio.run(run_and_look_around())
    assert pending == []
    agg = result.aggregate()
    assert agg["errors"] == 0 and agg["index_breaks"] == 0 and agg["frames"] == 30 and agg["requests"] == 9
    for r in result.streams:
        assert r.completed and len(r.latencies_ms) == len(r.send_times) == 3 and r.cache_bytes > 0
        assert r.send_times[1] < r.send_times[0] + r.latencies_ms[0] / 1000  # sent before the first result came back
        assert [int(x) for c in r.outputs for x in c["frame_index"]] == list(range(10))  # 4 + 4 + 2
        assert r.outputs[-1]["depth"].shape == (2, 28, 42)
    delta = result.server_metrics[server.metrics_url]
    assert delta["stac_frames_total"] == 30 and delta["stac_streams_ended_total"] == 3  # END arrived on every stream


def test_paced_pipelined_stream_keeps_camera_rate(server):
    config = FleetConfig(url=server.grpc_url, streams=1, first_stream_id=140, frames=8, chunk=4, height=28, width=42,
                         fps=8.0, source="random", progress=False, inflight=2)
    r = run_fleet(config).streams[0]
    assert r.completed and r.errors == [] and len(r.e2e_latencies_ms) == 2
    # The second chunk is not sent before its last frame is "captured", 1 s after the start.
    assert r.send_times[1] - r.send_times[0] >= 0.45 and r.finished_s - r.started_s >= 0.95


def test_pipelined_error_ends_only_its_stream(server):
    ids = [151, 152, 153]
    frames = _random_frames(ids, 8)
    frames[152] = np.zeros((8, 3, 50, 42), np.uint8)  # 50 is no multiple of the patch size: the server refuses it
    config = FleetConfig(url=server.grpc_url, streams=3, stream_ids=ids, frames=8, chunk=4, height=28, width=42,
                         progress=False, inflight=2)
    result = run_fleet(config, frames=frames)
    by_id = {r.stream_id: r for r in result.streams}
    bad = by_id.pop(152)
    assert not bad.completed and bad.frames_done == 0 and bad.restarts == 0
    assert len(bad.errors) == 1 and "patch size" in bad.errors[0] and bad.errors[0].startswith("frame 0: error:")
    for r in by_id.values():
        assert r.completed and r.errors == [] and r.frames_done == 8 and r.index_breaks == 0
