"""The stac model with Triton's decoupled transaction policy (a genuine tritonserver, CPU, tiny model).

Decoupled, execute() returns once a batch's outputs are on the host and the model's sender thread
sends the responses while the next batch computes. What must not change: every stream's results
equal the in-process engine's, in order, whether its chunks go one at a time (StacClient) or
pipelined (the fleet, two in flight); bad input is refused with a clear message and harms no other
stream; unary calls, which Triton cannot answer for a decoupled model, fail with a message that
says so instead of hanging. On a GPU machine, decoupled servers with host or GPU outputs send
what the unary server sends, bit for bit.
"""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

if importlib.util.find_spec("pytriton") is None or importlib.util.find_spec("tritonclient") is None:
    pytest.skip("serving extras not installed (pip install -e '.[serving]')", allow_module_level=True)

import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from stac_backend.client import StacClient, StreamError  # noqa: E402
from stac_backend.model import save_checkpoint  # noqa: E402
from stac_backend.loadgen.fleet import FleetConfig, run_fleet  # noqa: E402
from stac_backend.serving.repository import ServeSettings, render_config, write_repository  # noqa: E402
from stac_backend.tools.tritonserver import TritonServer  # noqa: E402

from conftest import make_tiny_model  # noqa: E402
from test_serving_triton import CACHE, H, W, local_reference, require_stub_imports_this_checkout, video  # noqa: E402

KEYS = ("depth", "depth_conf", "world_points", "world_points_conf", "pose_enc", "extrinsics")


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(seed=7)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model):
    require_stub_imports_this_checkout()
    work = tmp_path_factory.mktemp("decoupled")
    checkpoint = work / "tiny.safetensors"
    save_checkpoint(model, checkpoint)
    settings = ServeSettings(preset="", device="cpu", cache_config=CACHE, max_streams=6, idle_ttl_s=60.0,
                             triton_idle_us=60_000_000, max_queue_delay_us=20000, decoupled=True)
    repo = write_repository(work / "repo", settings, checkpoint_file=checkpoint)
    # check_numpy=False: the stac model moves tensors only through DLPack (numpy 2 safe, as local_server)
    with TritonServer(repo, log_file=work / "tritonserver.log", exit_timeout_s=5, check_numpy=False) as srv:
        yield srv


def assert_equal_to_engine(got: list[dict], expected: list[dict], where: str) -> None:
    assert len(got) == len(expected), where
    for out, want in zip(got, expected):
        assert out["frame_index"].tolist() == want["frame_index"].tolist(), where
        for key in KEYS:
            diff = np.abs(out[key] - want[key].numpy()).max()
            assert diff <= 1e-4, f"{where}: {key} differs by {diff}"


def test_render_config_writes_the_transaction_policy_only_when_decoupled():
    assert "model_transaction_policy { decoupled: true }" in render_config(ServeSettings(decoupled=True))
    assert "model_transaction_policy" not in render_config(ServeSettings())


def test_concurrent_streams_through_stac_client_equal_engine(server, model):
    videos = {700 + s: video(70 + s, 12) for s in range(3)}

    def run(sid):
        client = StacClient(server.grpc_url)
        try:
            assert client.decoupled()
            return [client.send_chunk(sid, videos[sid][i:i + 4], start=i == 0, end=i + 4 >= 12) for i in range(0, 12, 4)]
        finally:
            client.close()

    with ThreadPoolExecutor(3) as pool:
        results = dict(zip(videos, pool.map(run, videos)))
    for sid, frames in videos.items():
        assert_equal_to_engine(results[sid], local_reference(model, frames), f"stream {sid}")


@pytest.mark.parametrize("inflight", [1, 2])
def test_fleet_streams_equal_engine(server, model, inflight):
    """The fleet finds the server decoupled and streams; with two chunks in flight per stream the next
    batch runs while the sender still answers the last."""
    ids = [800 + 10 * inflight + k for k in range(3)]
    frames = {sid: video(sid, 16) for sid in ids}
    config = FleetConfig(url=server.grpc_url, streams=len(ids), stream_ids=ids, frames=16, chunk=4, height=H, width=W,
                         inflight=inflight, keep_outputs=True, progress=False, max_restarts=0)
    result = run_fleet(config, frames=dict(frames))
    assert result.errors == 0 and all(r.completed and r.index_breaks == 0 for r in result.streams)
    for record in result.streams:
        got = sorted(record.outputs, key=lambda o: o["first_frame"])
        assert_equal_to_engine(got, local_reference(model, frames[record.stream_id]), f"stream {record.stream_id}")


def test_bad_input_is_refused_and_other_stream_carries_on(server, model):
    frames = video(900, 8)
    expected = local_reference(model, frames)
    client, other = StacClient(server.grpc_url), StacClient(server.grpc_url)
    try:
        first = client.send_chunk(900, frames[:4], start=True)
        with pytest.raises(StreamError, match="multiples of the patch size"):
            other.send_chunk(901, np.zeros((4, 3, H + 1, W), np.uint8), start=True)
        with pytest.raises(StreamError, match="START"):
            other.send_chunk(902, frames[:4])  # never started
        second = client.send_chunk(900, frames[4:8], end=True)
    finally:
        client.close()
        other.close()
    assert_equal_to_engine([first, second], expected, "stream 900")


def test_refused_start_is_ended_in_triton_by_the_decoupled_model(server):
    """The model ends a refused START's sequence with an END request to itself (a decoupled call)."""
    import time
    from pathlib import Path

    client = StacClient(server.grpc_url)
    try:
        with pytest.raises(StreamError, match="at least one frame"):
            client.send_chunk(910, np.zeros((0, 3, H, W), np.uint8), start=True)
        time.sleep(1.0)
        assert client.send_chunk(910, video(910, 4), start=True, end=True)["frame_index"].tolist() == [0, 1, 2, 3]
    finally:
        client.close()
    log = Path(server.log_file).read_text(errors="replace")
    assert "housekeeping failed" not in log and "stream 910: request refused (INVALID_ARG)" in log


def test_unary_call_gets_a_clear_error(server):
    data = video(950, 4)[None]
    inputs = [grpcclient.InferInput("FRAMES", list(data.shape), "UINT8")]
    inputs[0].set_data_from_numpy(data)
    raw = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="decoupled"):
            raw.infer("stac", inputs, sequence_id=950, sequence_start=True, sequence_end=True)
    finally:
        raw.close()
    assert StacClient(server.grpc_url).is_ready()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU instances need a CUDA GPU")
def test_gpu_decoupled_server_equals_unary_server(tmp_path, model):
    """On a GPU instance, decoupled with host or GPU outputs (CUDA IPC from the sender thread) sends
    bit-identical outputs to the unary server's. Pipelined (three streams, three chunks in flight
    each), where execute() returns before its outputs' copies are done and the next batch queues
    behind them, every stream still gets its own values, in order."""
    checkpoint = tmp_path / "tiny.safetensors"
    save_checkpoint(model, checkpoint)
    frames = video(990, 12)
    fleet_ids = [991, 992, 993]
    fleet_frames = {sid: video(sid, 16) for sid in fleet_ids}
    got, pipelined = {}, {}
    for decoupled, where in ((False, "cpu"), (True, "cpu"), (True, "gpu")):
        settings = ServeSettings(preset="", device="auto", instance_kind="KIND_GPU", cache_config=CACHE,
                                 output_device=where, decoupled=decoupled, max_queue_delay_us=20000)
        repo = write_repository(tmp_path / f"repo_{decoupled}_{where}", settings, checkpoint_file=checkpoint)
        with TritonServer(repo, log_file=tmp_path / f"triton_{decoupled}_{where}.log", exit_timeout_s=5,
                          check_numpy=False) as srv:
            c = StacClient(srv.grpc_url)
            assert c.decoupled() == decoupled
            got[decoupled, where] = [c.send_chunk(990, frames[i:i + 4], start=i == 0, end=i + 4 >= 12) for i in range(0, 12, 4)]
            c.close()
            config = FleetConfig(url=srv.grpc_url, streams=3, stream_ids=fleet_ids, frames=16, chunk=4, height=H, width=W,
                                 inflight=3 if decoupled else 1, keep_outputs=True, progress=False, max_restarts=0)
            result = run_fleet(config, frames=dict(fleet_frames))
            assert result.errors == 0 and all(r.completed and r.index_breaks == 0 for r in result.streams)
            pipelined[decoupled, where] = {r.stream_id: sorted(r.outputs, key=lambda o: o["first_frame"]) for r in result.streams}
    for key in ((True, "cpu"), (True, "gpu")):
        for reference, out in zip(got[False, "cpu"], got[key]):
            assert set(reference) == set(out)
            for name, value in reference.items():
                np.testing.assert_array_equal(out[name], value, err_msg=f"{key} {name}")
        # Batches form differently from run to run (other GEMM shapes), so equal within float noise;
        # outputs of another stream or of a copy not yet done would be off by O(1).
        for sid in fleet_ids:
            for reference, out in zip(pipelined[False, "cpu"][sid], pipelined[key][sid], strict=True):
                assert out["frame_index"].tolist() == reference["frame_index"].tolist()
                for name in KEYS:
                    np.testing.assert_allclose(out[name], reference[name], atol=1e-3, err_msg=f"{key} stream {sid} {name}")
