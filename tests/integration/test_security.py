"""The stac model on a genuine tritonserver probed as a hostile or careless client would (CPU, tiny model).

One server for the module, with a fixed frame size, 3 streams, 6 Triton sequence slots and a short
idle TTL; a blocker (one 128-frame chunk, about a second or more of work) stands in for a slow server.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("pytriton") is None or importlib.util.find_spec("tritonclient") is None:
    pytest.skip("serving extras not installed (pip install -e '.[serving]')", allow_module_level=True)

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from stac_backend.client import StacClient, new_stream_id, new_stream_key  # noqa: E402
from stac_backend.serving.repository import local_server  # noqa: E402
from stac_backend.serving.settings import ServeSettings  # noqa: E402

H, W = 56, 84
BLOCKER_FRAMES = 128
TTL_S = 3.0
CACHE = {"policy": "window", "window": BLOCKER_FRAMES, "chunk": BLOCKER_FRAMES}
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    settings = ServeSettings.on_device(
        "cpu", preset="tiny", cache_config=CACHE, max_streams=3, idle_ttl_s=TTL_S, frame_size=(H, W),
        max_batch_size=4, max_queue_delay_us=1000, max_candidate_sequences=6,
    )
    srv = local_server(settings, tmp_path_factory.mktemp("security"), threads=1)
    yield srv
    srv.stop()


@pytest.fixture()
def grpc(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def frames(count: int, seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 3, h, w), dtype=np.uint8)


def infer(client, cid: int, chunk: np.ndarray, *, start=False, end=False, key=None, timeout=None, want_key=False):
    inputs = [grpcclient.InferInput("FRAMES", [1, *chunk.shape], "UINT8")]
    inputs[0].set_data_from_numpy(chunk[None])
    if key is not None:
        inputs.append(grpcclient.InferInput("STREAM_KEY", [1, 2], "INT64"))
        inputs[1].set_data_from_numpy(key)
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("FRAME_INDEX",) + (("STREAM_KEY",) if want_key else ())]
    return client.infer("stac", inputs, outputs=outputs, sequence_id=cid, sequence_start=start, sequence_end=end,
                        client_timeout=timeout)


def refused(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def metric(server, name: str) -> float:
    text = NO_PROXY.open(server.metrics_url, timeout=10).read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+]+)$", text, flags=re.M))


def shm_bytes(server) -> int:
    return sum(p.stat().st_size for p in Path("/dev/shm").glob(server.shm_prefix + "*"))


def server_log(server) -> str:
    return Path(server.log_file).read_text(errors="replace")


class Blocker:
    """A long START of its own stream (BLOCKER_FRAMES frames), run in a thread: the model is busy while it lasts."""

    def __init__(self, server):
        self.client = grpcclient.InferenceServerClient(server.grpc_url)
        self.cid = new_stream_id()
        self.thread = threading.Thread(target=self._run)

    def _run(self):
        infer(self.client, self.cid, frames(BLOCKER_FRAMES, seed=9), start=True, end=True, key=new_stream_key())

    def __enter__(self):
        self.thread.start()
        time.sleep(0.3)  # the blocker's batch has started
        return self

    def __exit__(self, *exc):
        self.thread.join(120)
        self.client.close()


# ---------------------------------------------------------------- protocols


def test_admin_protocols_need_the_admin_key(server, grpc):
    http = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    grpc_calls = {
        "shared memory": lambda **h: grpc.register_system_shared_memory("victim", "/stac-victim", 64, **h),
        "logging": lambda **h: grpc.update_log_settings({"log_verbose_level": 2}, **h),
        "statistics": lambda **h: grpc.get_inference_statistics("stac", **h),
        "model repository": lambda **h: grpc.unload_model("stac", **h),
        "trace": lambda **h: grpc.get_trace_settings(**h),
    }
    for name, call in grpc_calls.items():
        error = refused(call)
        assert error.status() == "StatusCode.UNAVAILABLE" and "restricted" in error.message(), name
    http_calls = {
        "shared memory": lambda: http.register_system_shared_memory("victim", "/stac-victim", 64),
        "logging": lambda: http.update_log_settings({"log_verbose_level": 2}),
        "statistics": lambda: http.get_inference_statistics("stac"),
        "model repository": lambda: http.unload_model("stac"),
    }
    for name, call in http_calls.items():
        error = refused(call)
        assert error.status() == "403" and "restricted" in error.message(), name
    # With the key they work; health, metadata and model config stay open without it.
    assert grpc.get_log_settings(headers=server.admin_headers("grpc"), as_json=True)["settings"]
    assert "model_stats" in http.get_inference_statistics("stac", headers=server.admin_headers("http"))
    assert grpc.is_server_ready() and http.is_model_ready("stac") and grpc.get_model_metadata("stac").name == "stac"
    assert grpc.get_model_config("stac").config.name == "stac"
    http.close()


def test_sizes_the_deployment_cannot_serve_are_refused_before_the_model(server, grpc):
    failed_before = metric(server, "stac_failed_requests_total")
    shm_before = shm_bytes(server)
    big = frames(4, h=518, w=518)  # 3.2 MB each, of a size this deployment does not serve
    for _ in range(10):
        error = refused(lambda: infer(grpc, new_stream_id(), big, start=True, key=new_stream_key()))
        assert error.status() == "StatusCode.INVALID_ARGUMENT" and "unexpected shape" in error.message()
    assert metric(server, "stac_failed_requests_total") == failed_before  # Triton refused them: the model never saw them
    assert shm_bytes(server) == shm_before  # nothing copied into the backend's shared memory, nothing kept
    error = refused(lambda: infer(grpc, new_stream_id(), frames(BLOCKER_FRAMES + 1), start=True, key=new_stream_key()))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and f"at most {BLOCKER_FRAMES} frames" in error.message()


# ---------------------------------------------------------------- sequence slots and idle time


def test_refused_starts_hold_no_sequence_slot(server, grpc):
    live = [(new_stream_id(), new_stream_key()) for _ in range(3)]
    for cid, key in live:  # the stream limit: 3 of the 6 sequence slots
        infer(grpc, cid, frames(2), start=True, key=key)
    for _ in range(4):  # admission refusals ("retry later") ...
        error = refused(lambda: infer(grpc, new_stream_id(), frames(2), start=True, key=new_stream_key(), timeout=10))
        assert error.status() == "StatusCode.UNAVAILABLE" and "retry later" in error.message()
    for _ in range(4):  # ... and refused input: together more than the 3 free slots
        error = refused(lambda: infer(grpc, new_stream_id(), frames(0), start=True, key=new_stream_key(), timeout=10))
        assert error.status() == "StatusCode.INVALID_ARGUMENT"
    infer(grpc, live[0][0], frames(2), end=True, key=live[0][1])
    # Capacity exists again: a valid stream is admitted at once (well inside the 3 s idle TTL).
    cid, key = new_stream_id(), new_stream_key()
    assert infer(grpc, cid, frames(2), start=True, key=key, timeout=2.0).as_numpy("FRAME_INDEX").tolist() == [[0, 1]]
    for cid, key in live[1:] + [(cid, key)]:
        infer(grpc, cid, frames(1), end=True, key=key)


def test_time_in_the_queue_is_not_idle_time(server, grpc):
    """A chunk that waits behind another client's long one, then a pause shorter than the TTL: the
    stream is kept (client silence is measured from its last answer, not from its request's arrival)."""
    cid, key = new_stream_id(), new_stream_key()
    infer(grpc, cid, frames(2), start=True, key=key)
    with Blocker(server):
        sent = time.monotonic()
        infer(grpc, cid, frames(2), key=key)
        queued = time.monotonic() - sent
    # Silent for less than the TTL since the answer, by half the queueing; from request arrival to
    # arrival, longer than the TTL by the other half (what a timer counting from arrivals would expire).
    assert queued > 0.3, f"the blocker held the model only {queued:.2f} s: the case is not exercised"
    pause = TTL_S - queued / 2
    time.sleep(pause)
    assert infer(grpc, cid, frames(2), key=key, end=True).as_numpy("FRAME_INDEX").tolist() == [[4, 5]]


def test_a_silent_stream_expires_and_frees_its_slot(server, grpc):
    cid, key = new_stream_id(), new_stream_key()
    infer(grpc, cid, frames(2), start=True, key=key)
    time.sleep(TTL_S + 2.0)
    error = refused(lambda: infer(grpc, cid, frames(2), key=key))
    assert "START" in error.message()  # Triton's sequence was ended with the stream's state
    log = server_log(server)
    assert len(re.findall(rf"stream {cid} expired: no request for", log)) == 1


# ---------------------------------------------------------------- ownership and cancellation


def test_a_stream_belongs_to_the_client_that_started_it(server, grpc):
    owner = StacClient(server.grpc_url)
    cid = new_stream_id()
    try:
        assert owner.send_chunk(cid, frames(4), start=True)["frame_index"].tolist() == [0, 1, 2, 3]
        for key in (None, new_stream_key()):  # no key, a guessed key
            error = refused(lambda: infer(grpc, cid, frames(4), key=key))
            assert error.status() == "StatusCode.NOT_FOUND"
            error = refused(lambda: infer(grpc, cid, frames(4), start=True, key=key))
            assert error.status() == "StatusCode.ALREADY_EXISTS"
        # The owner's stream went on untouched: neither fed nor restarted.
        assert owner.send_chunk(cid, frames(4), end=True)["frame_index"].tolist() == [4, 5, 6, 7]
    finally:
        owner.close()
    # A START without a key gets one from the server, and the stream then needs it.
    cid = new_stream_id()
    issued = infer(grpc, cid, frames(2), start=True, want_key=True).as_numpy("STREAM_KEY").reshape(1, 2)
    assert refused(lambda: infer(grpc, cid, frames(2))).status() == "StatusCode.NOT_FOUND"
    assert infer(grpc, cid, frames(2), key=issued, end=True).as_numpy("FRAME_INDEX").tolist() == [[2, 3]]


def test_a_cancelled_request_leaves_the_stream_as_it_was(server, grpc):
    cid, key = new_stream_id(), new_stream_key()
    infer(grpc, cid, frames(4), start=True, key=key)
    with Blocker(server):
        error = refused(lambda: infer(grpc, cid, frames(4, seed=1), key=key, timeout=0.3))
        assert error.status() == "StatusCode.DEADLINE_EXCEEDED"
        retry = infer(grpc, cid, frames(4, seed=1), key=key)  # the client's retry of the lost chunk
    assert retry.as_numpy("FRAME_INDEX").tolist() == [[4, 5, 6, 7]]  # inserted once
    infer(grpc, cid, frames(1), key=key, end=True)
    assert re.search(rf"stream {cid}: request refused \(CANCELLED\)", server_log(server))


# ---------------------------------------------------------------- status codes and logging


def test_status_codes_say_the_cause(server, grpc):
    http = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))

    def http_infer(cid, chunk, start):
        inputs = [httpclient.InferInput("FRAMES", [1, *chunk.shape], "UINT8")]
        inputs[0].set_data_from_numpy(chunk[None])
        return http.infer("stac", inputs, sequence_id=cid, sequence_start=start, sequence_end=False)

    bad = new_stream_id()
    error = refused(lambda: infer(grpc, bad, frames(0), start=True, key=new_stream_key()))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "at least one frame" in error.message()
    assert refused(lambda: http_infer(new_stream_id(), frames(0), True)).status() == "400"
    live = [(new_stream_id(), new_stream_key()) for _ in range(3)]
    for cid, key in live:
        infer(grpc, cid, frames(1), start=True, key=key)
    assert refused(lambda: infer(grpc, new_stream_id(), frames(1), start=True)).status() == "StatusCode.UNAVAILABLE"
    assert refused(lambda: http_infer(new_stream_id(), frames(1), True)).status() == "503"
    for cid, key in live:
        infer(grpc, cid, frames(1), end=True, key=key)
    # A request of a stream the model does not know (Triton still held its sequence): NOT_FOUND.
    cid, key = new_stream_id(), new_stream_key()
    infer(grpc, cid, frames(1), start=True, key=key)
    assert refused(lambda: infer(grpc, cid, frames(1), key=new_stream_key())).status() == "StatusCode.NOT_FOUND"
    infer(grpc, cid, frames(1), key=key, end=True)
    http.close()
    # Every refusal is logged once, with the stream id and the cause.
    log = server_log(server)
    assert len(re.findall(rf"stream {bad}: request refused \(INVALID_ARG\): bad FRAMES: a chunk needs at least one frame", log)) == 1


# ---------------------------------------------------------------- stac serve


def test_stac_serve_exits_nonzero_when_tritonserver_dies(tmp_path):
    stac = [sys.executable, "-m", "stac_backend.cli", "serve", "--device", "cpu", "--preset", "tiny",
            "--workdir", str(tmp_path), "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", "--quiet"]
    proc = subprocess.Popen(stac, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:
            if "ready in" in line or time.monotonic() > deadline:
                break
        assert "ready in" in line, line
        [triton] = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        regions = list(Path("/dev/shm").glob(f"stac-triton-{proc.pid}-*"))
        assert regions, "the server's Python backend regions carry its own prefix"
        os.kill(triton, signal.SIGKILL)
        assert proc.wait(60) == 1
        assert not list(Path("/dev/shm").glob(f"stac-triton-{proc.pid}-*"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
