"""The torch-free wire protocol and client (no server: a fake tritonclient answers)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from stac_backend import protocol
from stac_backend.client import LiveStream, StacClient, StreamError, explain
from stac_backend.serving.repository import PRODUCTION, ServeSettings, render_config

ROOT = Path(__file__).resolve().parents[2]

BLOCK_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked for this test")
        return None
sys.meta_path.insert(0, NoTorch())
"""


def test_client_imports_and_works_without_torch():
    """A camera-side install (tritonclient + numpy) must be enough for the client and the protocol."""
    code = BLOCK_TORCH + """
import numpy as np
import stac_backend.client as c
import stac_backend.protocol as p
frames = p.to_uint8_frames(np.full((2, 3, 14, 28), 0.5, np.float32))
assert frames.dtype == np.uint8 and int(frames[0, 0, 0, 0]) == 128
assert "torch" not in sys.modules
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_uint8_conversion_rounds_like_the_server_sees_it():
    x = np.array([0.0, 0.5 / 255, 0.499, 0.5, 1.0, 1.5, -0.2], dtype=np.float32).reshape(1, 1, 1, 7)
    assert protocol.to_uint8_frames(x).reshape(-1).tolist() == [0, 1, 127, 128, 255, 255, 0]
    u8 = np.arange(6, dtype=np.uint8).reshape(1, 1, 2, 3)
    assert protocol.to_uint8_frames(u8) is not None and protocol.to_uint8_frames(u8).tolist() == u8.tolist()
    with pytest.raises(ValueError, match="uint8"):
        protocol.to_uint8_frames(np.zeros((1, 3, 14, 14), np.int32))


def test_one_decoupled_check_for_configs_and_client_replies():
    config = {"model_transaction_policy": {"decoupled": True}}
    assert protocol.is_decoupled(config) and protocol.is_decoupled({"config": config})
    assert not protocol.is_decoupled({}) and not protocol.is_decoupled({"config": {}})


def test_the_rendered_config_publishes_frame_size_and_preprocessing():
    import json
    import re

    text = render_config(PRODUCTION)
    params = {m.group(1): {"string_value": json.loads(m.group(2))}
              for m in re.finditer(r'parameters: \{ key: "(\w+)" value: \{ string_value: ("[^"]*") \} \}', text)}
    spec = protocol.frame_spec({"parameters": params})
    assert spec == protocol.FrameSpec(size=518, preprocess="crop", color_order="RGB")
    # nothing published: size 0 (the CLI then asks for --size)
    assert "IMAGE_SIZE" not in render_config(ServeSettings())
    assert protocol.frame_spec({}).size == 0


def test_check_chunk_refuses_what_the_server_refuses():
    protocol.check_chunk(np.zeros((4, 3, 28, 42), np.uint8), chunk=4)
    for bad, match in ((np.zeros((3, 28, 42)), "shape"), (np.zeros((5, 3, 28, 42)), "1..4"),
                       (np.zeros((1, 3, 30, 42)), "multiple of 14")):
        with pytest.raises(ValueError, match=match):
            protocol.check_chunk(bad, chunk=4)


# ---------------------------------------------------------------------------------- fake tritonclient
class FakeError(Exception):
    def __init__(self, msg, status=None):
        super().__init__(msg)
        self._msg, self._status = msg, status

    def message(self):
        return self._msg

    def status(self):
        return self._status


class FakeInput:
    def __init__(self, name, shape, dtype):
        self.name, self.shape, self.dtype = name, shape, dtype

    def set_data_from_numpy(self, data):
        self.data = data


class FakeResult:
    def __init__(self, request_id, frames, first):
        self._id = request_id
        n = frames.shape[1]
        self.arrays = {"FRAME_INDEX": np.arange(first, first + n)[None], "DEPTH": frames[:, :, 0].astype(np.float32),
                       "CACHE_BYTES": np.array([[1000]])}

    def get_response(self):
        return type("R", (), {"id": self._id})()

    def as_numpy(self, name):
        return self.arrays.get(name, np.zeros((1, 1), np.float32))


class FakeServerClient:
    """One gRPC stream; answers each request after ``delay`` s on its own thread, in order."""

    log: list = []
    delay = 0.05

    def __init__(self, url, ssl=False, root_certificates=None):
        self.url = url
        self.callback = None
        self.frames_seen = 0

    def get_model_config(self, model, as_json=False, client_timeout=None):
        if self.url.endswith(":1"):
            raise FakeError("failed to connect to all addresses", "StatusCode.UNAVAILABLE")
        return {"config": {"parameters": {"IMAGE_SIZE": {"string_value": "112"}}}}

    def start_stream(self, callback, headers=None):
        self.callback, self.headers = callback, headers

    def async_stream_infer(self, model, inputs, outputs=None, request_id="", sequence_id=0, sequence_start=False,
                           sequence_end=False, **kw):
        data = inputs[0].data
        FakeServerClient.log.append((sequence_id, int(request_id), data.shape[1], sequence_start, sequence_end, time.monotonic()))
        first, self.frames_seen = self.frames_seen, self.frames_seen + data.shape[1]
        threading.Timer(self.delay, self.callback, args=(FakeResult(request_id, data, first), None)).start()

    def stop_stream(self):
        pass

    def close(self):
        pass


class FakeGrpc:
    InferInput = FakeInput
    InferenceServerException = FakeError
    InferenceServerClient = FakeServerClient

    class InferRequestedOutput:
        def __init__(self, name):
            self.name = name


@pytest.fixture
def client(monkeypatch):
    monkeypatch.setattr("stac_backend.client._grpc", lambda: FakeGrpc)
    FakeServerClient.log = []
    return StacClient("fake:8001")


def test_live_stream_never_waits_for_results(client):
    """submit returns at once; results complete later, in order; close() ends the stream with END
    on a repeat of the last frame whose result nobody sees."""
    live = client.live_stream(stream_id=7, max_inflight=4, outputs=("depth", "frame_index"))
    chunks = [np.full((4, 3, 14, 14), k, np.uint8) for k in range(3)]
    started = time.monotonic()
    futures = [live.submit(c) for c in chunks]
    assert time.monotonic() - started < FakeServerClient.delay  # no submit waited for an answer
    results = [f.result(timeout=5) for f in futures]
    assert [r["frame_index"].tolist() for r in results] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert [int(r["depth"][0, 0, 0]) for r in results] == [0, 1, 2]
    live.close()
    log = FakeServerClient.log
    assert [(start, end) for _, _, _, start, end, _ in log] == [(True, False), (False, False), (False, False), (False, True)]
    assert log[-1][2] == 1  # the END repeat is one frame
    assert list(live.results()) == results  # the repeat's result is not among them


def test_live_stream_applies_back_pressure_at_max_inflight(client):
    live = client.live_stream(stream_id=8, max_inflight=1)
    live.submit(np.zeros((2, 3, 14, 14), np.uint8))
    started = time.monotonic()
    live.submit(np.zeros((2, 3, 14, 14), np.uint8), end=True)  # waits for the first answer only
    assert time.monotonic() - started >= FakeServerClient.delay * 0.5
    assert len(list(live.results())) == 2
    live.close()
    assert [entry[4] for entry in FakeServerClient.log] == [False, True]  # no extra END when the last had it


def test_live_stream_from_asyncio(client):
    import asyncio

    async def camera():
        live = client.live_stream(stream_id=9, max_inflight=2)
        pending = [await live.asend(np.zeros((1, 3, 14, 14), np.uint8), end=k == 2) for k in range(3)]
        outs = [await p for p in pending]
        live.close()
        return outs

    outs = asyncio.run(camera())
    assert [int(o["frame_index"][0]) for o in outs] == [0, 1, 2]
    assert [entry[3:5] for entry in FakeServerClient.log] == [(True, False), (False, False), (False, True)]


def test_unreachable_server_is_one_line_with_a_hint(client):
    bad = StacClient("nowhere:1")
    with pytest.raises(StreamError) as err:
        bad.frame_spec()
    message = str(err.value)
    assert "\n" not in message and "nowhere:1" in message and "stac serve" in message
    assert client.frame_spec().size == 112


def test_explain_keeps_the_servers_words_for_refusals():
    line = explain(FakeError("stream 3: too many live streams (16)\nmore", "StatusCode.INTERNAL"), "h:1", 3)
    assert line == "stream 3: stream 3: too many live streams (16)"


def test_live_stream_rejects_bad_settings(client):
    with pytest.raises(ValueError, match="max_inflight"):
        LiveStream(client, 1, max_inflight=0)
