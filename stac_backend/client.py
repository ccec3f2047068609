"""gRPC client SDK for the ``stac`` model on Triton.

    from stac_backend.client import StacClient
    client = StacClient("localhost:8001")
    for out in client.stream(frames, stream_id=17, chunk_size=4):   # frames: iterable of [3, H, W]
        out["depth"], out["world_points"], out["extrinsics"], ...   # numpy, [C, ...]

Output dtypes are what the server sends (``as_numpy`` keeps them): float32 for POSE_ENC,
EXTRINSICS and INTRINSICS, int64 for FRAME_INDEX/CACHE_BYTES, and for the dense outputs (depth,
depth_conf, world_points, world_points_conf) float32 by default or **float16** from a server
configured with ``OUTPUT_DTYPE=float16`` (``stac serve --output-dtype float16``; relative error
<= 2^-11, |x| clamped to 65504). Cast with ``.astype(np.float32)`` where float32 arithmetic is needed.

Each stream is one Triton sequence: the first chunk carries sequence_start, the last
sequence_end. The stream id is also sent as an ``x-stream-id`` header so that a proxy in front
of several Triton replicas can route every chunk of a stream to the same replica.

A server with the decoupled transaction policy (``stac serve --decoupled``) answers gRPC streams
only: the client reads the model's config on first use and then sends each camera stream's chunks
over one bidirectional gRPC stream (opened at the stream's first chunk, closed after its END),
one chunk at a time as before. Its ``x-stream-id`` header then travels with the gRPC stream.

Ownership: the client draws a secret STREAM_KEY (128 random bits) at each stream's START and sends
it with every chunk of that stream; the server binds the stream to it, so nobody else can feed or
restart the stream. Pick stream ids at random (``new_stream_id()``): ids need not be secret, but a guessable
id lets another client end its Triton sequence.

Retries: only errors that mean the request never reached the model (the server was unreachable)
are retried, at most ``retries`` times with exponential backoff. A chunk the model may already have
consumed is never re-sent, since that would feed the same frames into the stream twice.
"""

from __future__ import annotations

import queue
import secrets
import time
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

from .serving.repository import is_decoupled

OUTPUT_KEYS = {
    "DEPTH": "depth",
    "DEPTH_CONF": "depth_conf",
    "WORLD_POINTS": "world_points",
    "WORLD_POINTS_CONF": "world_points_conf",
    "POSE_ENC": "pose_enc",
    "EXTRINSICS": "extrinsics",
    "INTRINSICS": "intrinsics",
    "FRAME_INDEX": "frame_index",
    "CACHE_BYTES": "cache_bytes",
}
RETRYABLE = ("StatusCode.UNAVAILABLE",)


def new_stream_id() -> int:
    """A random positive 63-bit sequence id."""
    return secrets.randbits(63) or 1


def new_stream_key() -> np.ndarray:
    """A secret STREAM_KEY input value: [1, 2] int64 (128 random bits)."""
    return np.frombuffer(secrets.token_bytes(16), dtype=np.int64).reshape(1, 2).copy()


class StreamError(RuntimeError):
    """The server refused or failed a chunk; the message is the server's."""


def as_uint8_frames(frames) -> np.ndarray:
    """[C, 3, H, W] uint8 from uint8 or float-in-[0, 1] tensors/arrays."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return np.ascontiguousarray(frames)
    return np.ascontiguousarray((np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


class StacClient:
    def __init__(self, url: str = "localhost:8001", model: str = "stac", retries: int = 3, backoff_s: float = 0.2,
                 timeout_s: Optional[float] = 120.0, ssl: bool = False, root_certificates: Optional[str] = None):
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.url = url
        self.model = model
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.client = grpcclient.InferenceServerClient(url, ssl=ssl, root_certificates=root_certificates)
        self._decoupled: Optional[bool] = None  # read from the model's config on first use
        self._keys: dict[int, np.ndarray] = {}  # stream id -> the key drawn at its START
        self._stream_id: Optional[int] = None  # the camera stream the open gRPC stream carries
        self._responses: "queue.Queue" = queue.Queue()

    def send_chunk(self, stream_id: int, frames, start: bool = False, end: bool = False,
                   outputs: Optional[Iterable[str]] = None) -> dict[str, np.ndarray]:
        """One chunk [C, 3, H, W] of one stream; returns outputs without the batch dimension.

        outputs: the keys wanted (e.g. ``("depth", "pose_enc")``; default all). The server sends only
        those: a 518x392 frame's dense float outputs are ~5 MB, most of it points and confidences.
        Arrays come in the dtypes the server sends: the dense outputs are float16 from a server with
        ``OUTPUT_DTYPE=float16`` (half the bytes), float32 otherwise (module docstring).
        """
        data = as_uint8_frames(frames)[None]
        inputs = [self._grpc.InferInput("FRAMES", list(data.shape), "UINT8")]
        inputs[0].set_data_from_numpy(data)
        wanted = {name: key for name, key in OUTPUT_KEYS.items() if outputs is None or key in set(outputs)}
        unknown = set(outputs or ()) - set(OUTPUT_KEYS.values())
        if unknown or not wanted:
            raise ValueError(f"unknown or no outputs {sorted(unknown)}; choose from {sorted(OUTPUT_KEYS.values())}")
        requested = [self._grpc.InferRequestedOutput(name) for name in wanted]
        if start and int(stream_id) not in self._keys:
            self._keys[int(stream_id)] = new_stream_key()
        key = self._keys.get(int(stream_id))
        if key is not None:
            inputs.append(self._grpc.InferInput("STREAM_KEY", [1, 2], "INT64"))
            inputs[-1].set_data_from_numpy(key)
        if end:
            self._keys.pop(int(stream_id), None)
        if self.decoupled():
            result = self._stream_call(int(stream_id), inputs, requested, start, end)
            return {key: result.as_numpy(name)[0] for name, key in wanted.items()}
        attempt = 0
        while True:
            try:
                result = self.client.infer(
                    self.model, inputs, outputs=requested, sequence_id=int(stream_id), sequence_start=start,
                    sequence_end=end, headers={"x-stream-id": str(stream_id)}, client_timeout=self.timeout_s,
                )
                break
            except self._grpc.InferenceServerException as exc:
                transient = any(code in str(exc.status()) for code in RETRYABLE)
                if not transient or attempt >= self.retries:
                    raise StreamError(f"stream {stream_id}: {exc.message()}") from exc
                time.sleep(self.backoff_s * 2**attempt)
                attempt += 1
        return {key: result.as_numpy(name)[0] for name, key in wanted.items()}

    def decoupled(self) -> bool:
        """Whether the server's model is decoupled (answers gRPC streams only); asked once."""
        if self._decoupled is None:
            try:
                config = self.client.get_model_config(self.model, as_json=True).get("config", {})
            except self._grpc.InferenceServerException:
                return False  # not known yet: the request itself will report what is wrong
            self._decoupled = is_decoupled(config)
        return self._decoupled

    def _stream_call(self, stream_id: int, inputs, requested, start: bool, end: bool):
        """One request over the camera stream's gRPC stream, waiting for its one response."""
        if self._stream_id != stream_id:
            self._close_stream()
            self._responses = queue.Queue()
            responses = self._responses
            self.client.start_stream(callback=lambda result, error: responses.put((result, error)),
                                     headers={"x-stream-id": str(stream_id)})
            self._stream_id = stream_id
        try:
            self.client.async_stream_infer(self.model, inputs, outputs=requested, sequence_id=stream_id,
                                           sequence_start=start, sequence_end=end)
            result, error = self._responses.get(timeout=self.timeout_s)
        except queue.Empty:
            self._close_stream()
            raise StreamError(f"stream {stream_id}: no response within {self.timeout_s} s") from None
        except self._grpc.InferenceServerException as exc:
            self._close_stream()
            raise StreamError(f"stream {stream_id}: {exc.message()}") from exc
        if error is not None:
            raise StreamError(f"stream {stream_id}: {error.message()}")
        if end:
            self._close_stream()
        return result

    def _close_stream(self) -> None:
        if self._stream_id is not None:
            self._stream_id = None
            self.client.stop_stream()

    def stream(self, frames: Iterable, stream_id: int, chunk_size: int = 4) -> Iterator[dict[str, np.ndarray]]:
        """Send frames [3, H, W] as chunks of ``chunk_size``; START on the first, END on the last."""
        chunk: list = []
        previous: Optional[np.ndarray] = None
        first = True
        for frame in frames:
            chunk.append(as_uint8_frames(frame[None])[0])
            if len(chunk) == chunk_size:
                if previous is not None:  # one chunk of lookahead: the last one must carry END
                    yield self.send_chunk(stream_id, previous, start=first)
                    first = False
                previous, chunk = np.stack(chunk), []
        if chunk:
            if previous is not None:
                yield self.send_chunk(stream_id, previous, start=first)
                first = False
            previous = np.stack(chunk)
        if previous is not None:
            yield self.send_chunk(stream_id, previous, start=first, end=True)

    def is_ready(self) -> bool:
        try:
            return bool(self.client.is_server_ready()) and bool(self.client.is_model_ready(self.model))
        except Exception:  # noqa: BLE001 - unreachable means not ready
            return False

    def close(self) -> None:
        self._close_stream()
        self.client.close()
