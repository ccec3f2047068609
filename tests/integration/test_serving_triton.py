"""The stac model served by a genuine tritonserver (CPU, tiny model), driven by real gRPC clients.

One server for the module: 4 concurrent interleaved streams equal the in-process engine; the
lifecycle (END, repeated START) frees and resets state; every kind of bad input gets a
clear error while another live stream keeps getting correct answers and the server stays ready.
"""

from __future__ import annotations

import importlib.util
import random
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("pytriton") is None or importlib.util.find_spec("tritonclient") is None:
    pytest.skip("serving extras not installed (pip install -e '.[serving]')", allow_module_level=True)

import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from stac_backend.cache import CacheConfig  # noqa: E402
from stac_backend.client import StacClient, StreamError  # noqa: E402
from stac_backend.engine import Stream  # noqa: E402
from stac_backend.model import save_checkpoint  # noqa: E402
from stac_backend.serving.repository import ServeSettings, write_repository  # noqa: E402
from stac_backend.tools.tritonserver import TritonServer  # noqa: E402

from conftest import make_tiny_model  # noqa: E402

CACHE = {"policy": "stac", "retrieval_start_frame": 8, "voxel_size": 0.01, "conf_threshold": 0.0}
IDLE_TTL_S = 60.0  # long: a loaded CI machine must not expire streams mid-test (expiry: tests/unit/test_sessions.py)
MAX_STREAMS = 5
H, W = 56, 84
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(seed=7)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model):
    work = tmp_path_factory.mktemp("serving")
    checkpoint = work / "tiny.safetensors"
    save_checkpoint(model, checkpoint)
    settings = ServeSettings(
        preset="", dtype="float32", device="cpu", instance_kind="KIND_CPU", cache_config=CACHE,
        max_streams=MAX_STREAMS, idle_ttl_s=IDLE_TTL_S, triton_idle_us=int(IDLE_TTL_S * 1e6),
        max_image_pixels=300 * 300, max_queue_delay_us=20000,
    )
    repo = write_repository(work / "repo", settings, checkpoint_file=checkpoint)
    srv = TritonServer(repo, log_file=work / "tritonserver.log", exit_timeout_s=5)
    with srv:
        yield srv


@pytest.fixture()
def client(server):
    c = StacClient(server.grpc_url)
    yield c
    c.close()


def video(seed: int, frames: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, 3, H, W), dtype=np.uint8)


def metrics(server) -> dict[str, float]:
    text = NO_PROXY.open(server.metrics_url, timeout=10).read().decode()
    values = {}
    for name in ("stac_active_streams", "stac_cache_bytes", "stac_rejected_starts_total", "stac_streams_expired_total"):
        found = re.findall(rf"^{name}\{{[^}}]*\}} ([0-9.e+]+)$", text, flags=re.M)
        values[name] = sum(float(v) for v in found)
    return values


def local_reference(model, frames: np.ndarray) -> list[dict]:
    stream = Stream(model, cache=CacheConfig(**CACHE))
    return [stream.push(frames[i : i + 4]) for i in range(0, len(frames), 4)]


def test_concurrent_interleaved_streams_equal_in_process_engine(server, model):
    videos = {100 + s: video(s) for s in range(4)}
    # Each stream sends its chunks in order from its own thread and connection; random pauses
    # interleave the four streams' requests differently on every chunk.
    results: dict[int, list] = {sid: [None] * 4 for sid in videos}

    def run_stream(sid):
        client = StacClient(server.grpc_url)
        try:
            for i in range(4):
                time.sleep(random.Random(sid * 10 + i).random() * 0.05)  # interleave with the others
                frames = videos[sid][4 * i : 4 * i + 4]
                results[sid][i] = client.send_chunk(sid, frames, start=i == 0, end=i == 3)
        finally:
            client.close()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(run_stream, videos))
    for sid, frames in videos.items():
        expected = local_reference(model, frames)
        for got, want in zip(results[sid], expected):
            assert got["frame_index"].tolist() == want["frame_index"].tolist()
            for key in ("depth", "depth_conf", "world_points", "world_points_conf", "pose_enc", "extrinsics"):
                diff = np.abs(got[key] - want[key].numpy()).max()
                assert diff <= 1e-4, f"stream {sid} {key} differs by {diff}"


def test_only_requested_outputs_are_sent(server, client, model):
    frames = video(11, 8)
    want = local_reference(model, frames)
    first = client.send_chunk(11, frames[:4], start=True, outputs=("depth", "pose_enc"))
    assert set(first) == {"depth", "pose_enc"}
    second = client.send_chunk(11, frames[4:8], end=True, outputs=("frame_index", "cache_bytes"))
    assert set(second) == {"frame_index", "cache_bytes"}
    assert second["frame_index"].tolist() == [4, 5, 6, 7] and second["cache_bytes"] > 0
    for key in ("depth", "pose_enc"):
        assert np.abs(first[key] - want[0][key].numpy()).max() <= 1e-4
    with pytest.raises(ValueError, match="unknown"):
        client.send_chunk(12, frames[:4], start=True, outputs=("depth", "normals"))


def test_end_frees_memory_and_repeated_start_resets(server, client):
    frames = video(7, 8)
    first = client.send_chunk(7, frames[:4], start=True)
    assert metrics(server)["stac_active_streams"] >= 1
    client.send_chunk(7, frames[4:8])
    again = client.send_chunk(7, frames[:4], start=True)  # repeated START: a fresh stream
    assert again["frame_index"].tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(again["depth"], first["depth"])
    assert again["cache_bytes"] == first["cache_bytes"]
    client.send_chunk(7, frames[4:8], end=True)
    with pytest.raises(StreamError, match="START|sequence"):
        client.send_chunk(7, frames[:4])  # after END the stream is gone
    m = metrics(server)
    assert m["stac_active_streams"] == 0 and m["stac_cache_bytes"] == 0


BAD_REQUESTS = {
    "wrong dtype": (lambda: _raw_infer_input(np.zeros((1, 1, 3, H, W), np.float32), "FP32"), "expects 'UINT8'"),
    "wrong rank": (lambda: _raw_infer_input(np.zeros((1, 3, H, W), np.uint8), "UINT8"), "unexpected shape"),
    "wrong H/W": (lambda: _raw_infer_input(np.zeros((1, 1, 3, 50, W), np.uint8), "UINT8"), "multiples of the patch size"),
    "too many frames": (lambda: _raw_infer_input(np.zeros((1, 5, 3, H, W), np.uint8), "UINT8"), "at most 4 frames"),
    "oversized": (lambda: _raw_infer_input(np.zeros((1, 1, 3, 308, 308), np.uint8), "UINT8"), "oversized"),
}


def _raw_infer_input(array, dtype):
    tensor = grpcclient.InferInput("FRAMES", list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return [tensor]


def _good_step(client, sid, frames, step, model_frames):
    out = client.send_chunk(sid, frames[4 * step : 4 * step + 4], start=step == 0)
    assert out["frame_index"].tolist() == list(range(4 * step, 4 * step + 4))
    np.testing.assert_allclose(out["depth"], model_frames[step]["depth"].numpy(), atol=1e-4)


@pytest.mark.parametrize("kind", list(BAD_REQUESTS))
def test_bad_input_is_refused_and_harms_no_other_stream(server, client, model, kind):
    live, frames = 300, video(300, 8)
    expected = local_reference(model, frames)
    _good_step(client, live, frames, 0, expected)
    make_inputs, expected_message = BAD_REQUESTS[kind]
    with pytest.raises(InferenceServerException, match=re.escape(expected_message)) as info:
        client.client.infer("stac", make_inputs(), sequence_id=301, sequence_start=True, sequence_end=True)
    assert "Traceback" not in str(info.value)
    _good_step(client, live, frames, 1, expected)
    client.send_chunk(live, frames[:4], start=True, end=True)  # clean up
    assert client.is_ready()


def test_no_start_and_unknown_ids_are_refused(server, client, model):
    live, frames = 400, video(400, 8)
    expected = local_reference(model, frames)
    _good_step(client, live, frames, 0, expected)
    with pytest.raises(StreamError, match="START|start"):
        client.send_chunk(401, frames[:4])  # never started
    with pytest.raises(InferenceServerException, match="correlation ID"):
        client.client.infer("stac", _raw_infer_input(frames[None, :4], "UINT8"))  # no sequence id at all
    _good_step(client, live, frames, 1, expected)
    client.send_chunk(live, frames[:4], start=True, end=True)
    assert client.is_ready()


def test_start_beyond_stream_limit_is_refused(server, client, model):
    frames = video(500, 8)
    opened = [500 + i for i in range(MAX_STREAMS)]
    for sid in opened:
        client.send_chunk(sid, frames[:4], start=True)
    with pytest.raises(StreamError, match="limit"):
        client.send_chunk(600, frames[:4], start=True)
    assert metrics(server)["stac_rejected_starts_total"] >= 1
    # The live streams carry on correctly.
    expected = local_reference(model, frames)
    out = client.send_chunk(opened[0], frames[4:8])
    np.testing.assert_allclose(out["depth"], expected[1]["depth"].numpy(), atol=1e-4)
    for sid in opened:
        client.send_chunk(sid, frames[:4], start=True, end=True)
    assert metrics(server)["stac_active_streams"] == 0
    assert client.is_ready()


def test_direct_strategy_null_requests_touch_no_stream(tmp_path, model):
    """With the direct strategy, idle batch slots arrive as null requests (READY=0): they must be
    answered without touching any stream while the other streams stay exact."""
    checkpoint = tmp_path / "tiny.safetensors"
    save_checkpoint(model, checkpoint)
    settings = ServeSettings(preset="", device="cpu", cache_config=CACHE, strategy="direct", max_batch_size=4,
                             max_queue_delay_us=20000)
    repo = write_repository(tmp_path / "repo", settings, checkpoint_file=checkpoint)
    videos = {700 + s: video(70 + s, 4 * (s + 1)) for s in range(3)}  # streams end at different times
    results: dict[int, list] = {sid: [] for sid in videos}
    with TritonServer(repo, log_file=tmp_path / "triton.log", exit_timeout_s=5) as srv:

        def run_stream(sid):
            c = StacClient(srv.grpc_url)
            frames = videos[sid]
            for i in range(0, len(frames), 4):
                results[sid].append(c.send_chunk(sid, frames[i : i + 4], start=i == 0, end=i + 4 >= len(frames)))
            c.close()

        with ThreadPoolExecutor(3) as pool:
            list(pool.map(run_stream, videos))
        assert metrics(srv)["stac_active_streams"] == 0
    for sid, frames in videos.items():
        for got, want in zip(results[sid], local_reference(model, frames)):
            assert np.abs(got["depth"] - want["depth"].numpy()).max() <= 1e-4


DENSE = ("depth", "depth_conf", "world_points", "world_points_conf")


def require_stub_imports_this_checkout():
    """The server's Python stub runs isolated (PYTHONPATH ignored) in the launcher's venv, so it imports
    the venv's stac_backend: from another checkout (a git worktree tested with the main checkout's
    venv) the server would run that checkout's model, and a new server-side feature cannot work."""
    import subprocess
    import sys

    import stac_backend
    from stac_backend.tools.triton_install import stub_python_dir

    probe = "import importlib.util; print(importlib.util.find_spec('stac_backend').origin)"
    origin = subprocess.run([str(stub_python_dir() / "python3"), "-I", "-c", probe], capture_output=True, text=True,
                            check=True).stdout.strip()
    here = stac_backend.__file__
    if Path(origin).resolve() != Path(here).resolve():
        pytest.fail(f"the tritonserver stub would import stac_backend from {origin}, not {here} (the stub ignores "
                    f"PYTHONPATH); run the tests with a venv whose stac_backend is this checkout ({sys.executable})")


def test_float16_outputs_server(tmp_path, model):
    """OUTPUT_DTYPE=float16: the dense outputs arrive as float16 (the engine's float32 values to within
    fp16 rounding), poses as float32, FRAME_INDEX as int64; a request for some outputs gets just those."""
    require_stub_imports_this_checkout()
    checkpoint = tmp_path / "tiny.safetensors"
    save_checkpoint(model, checkpoint)
    settings = ServeSettings(preset="", device="cpu", cache_config=CACHE, output_dtype="float16", max_queue_delay_us=20000)
    repo = write_repository(tmp_path / "repo", settings, checkpoint_file=checkpoint)
    frames = video(800, 12)
    expected = local_reference(model, frames)
    with TritonServer(repo, log_file=tmp_path / "triton.log", exit_timeout_s=5) as srv:
        c = StacClient(srv.grpc_url)
        got = [c.send_chunk(800, frames[:4], start=True),
               c.send_chunk(800, frames[4:8], outputs=("depth", "world_points")),  # only float16 outputs
               c.send_chunk(800, frames[8:12], end=True, outputs=("extrinsics", "frame_index"))]  # none
        c.close()
    assert set(got[1]) == {"depth", "world_points"} and set(got[2]) == {"extrinsics", "frame_index"}
    for out, want in zip(got, expected):
        for key, value in out.items():
            if key == "cache_bytes":
                continue
            reference = want[key].numpy()
            if key in DENSE:
                assert value.dtype == np.float16, key
                # fp16 rounding (relative 2^-11) on top of the float32 server's tolerance
                np.testing.assert_allclose(value.astype(np.float32), reference, rtol=2**-11, atol=1e-4, err_msg=key)
            elif key == "frame_index":
                assert value.dtype == np.int64 and value.tolist() == reference.tolist()
            else:
                assert value.dtype == np.float32, key
                np.testing.assert_allclose(value, reference, atol=1e-4, err_msg=key)
    # The first chunk asked for everything: every dense output went through fp16, poses did not.
    assert {k for k, v in got[0].items() if getattr(v, "dtype", None) == np.float16} == set(DENSE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="OUTPUT_DEVICE=gpu needs a CUDA GPU")
def test_gpu_outputs_server_equals_host_outputs_server(tmp_path, model):
    """OUTPUT_DEVICE=gpu changes only how outputs reach Triton (CUDA IPC instead of a host copy and
    shared memory): the same stream gets bit-identical outputs from a server with host outputs."""
    require_stub_imports_this_checkout()
    checkpoint = tmp_path / "tiny.safetensors"
    save_checkpoint(model, checkpoint)
    frames = video(900, 12)
    got = {}
    for where in ("cpu", "gpu"):
        settings = ServeSettings(preset="", device="auto", instance_kind="KIND_GPU", cache_config=CACHE,
                                 output_dtype="float16", output_device=where, max_queue_delay_us=20000)
        repo = write_repository(tmp_path / f"repo_{where}", settings, checkpoint_file=checkpoint)
        with TritonServer(repo, log_file=tmp_path / f"triton_{where}.log", exit_timeout_s=5) as srv:
            c = StacClient(srv.grpc_url)
            got[where] = [c.send_chunk(900, frames[i:i + 4], start=i == 0, end=i + 4 >= len(frames)) for i in range(0, 12, 4)]
            c.close()
    for host, device in zip(got["cpu"], got["gpu"]):
        assert set(host) == set(device)
        for key, value in host.items():
            assert np.asarray(device[key]).dtype == np.asarray(value).dtype, key
            np.testing.assert_array_equal(device[key], value, err_msg=key)
