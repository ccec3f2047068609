"""gRPC client SDK for the ``stac`` model on Triton (needs tritonclient and numpy only, no torch).

    pip install "stac-backend[client]"

    from stac_backend.client import StacClient
    client = StacClient("localhost:8001")
    client.frame_spec()                  # FrameSpec(size=518, preprocess='crop', color_order='RGB')
    for out in client.stream(frames, stream_id=17):   # frames: iterable of [3, H, W] uint8 RGB
        out["depth"], out["world_points"], out["extrinsics"], ...   # numpy, [C, ...]

    live = client.live_stream(stream_id=18)           # a live camera: never waits for a result
    future = live.submit(chunk)                       # [C, 3, H, W]; a concurrent.futures.Future
    ...  future.result() / await (await live.asend(chunk)) / live.results()
    live.close()                                      # ends the stream (END) and frees its cache

Output dtypes are what the server sends: float32 for POSE_ENC, EXTRINSICS and INTRINSICS, int64 for
FRAME_INDEX/CACHE_BYTES, and for the dense outputs (depth, depth_conf, world_points,
world_points_conf) float32 by default or float16 from a server with ``OUTPUT_DTYPE=float16``. The
wire contract (colour order, sizes, units, frames of reference) is in docs/serving.md and
:mod:`stac_backend.protocol`.

Each camera stream is one Triton sequence: START on its first chunk, END on its last; the stream id
also travels as the ``x-stream-id`` header for a stream-affine proxy.

- ``send_chunk``/``stream``: one request at a time (unary; over a gRPC stream when the model is
  decoupled, which answers streams only). ``stream`` sends a chunk as soon as it is full and the
  next frame exists (one frame of lookahead to know which chunk is the last) and waits for its
  result before sending the next.
- ``live_stream``: a :class:`LiveStream` keeps up to ``max_inflight`` chunks outstanding on one
  bidirectional gRPC stream (works with decoupled and unary models alike); ``submit`` returns at once
  with a future, results arrive on tritonclient's stream thread. Thread-friendly (futures) and
  asyncio-friendly (``asend``/``asubmit``). A camera does not know its last chunk in advance: ``close()``
  ends the stream by re-sending the last frame with END and drops that one result (the stream's
  state is freed at END, so the repeat changes nothing that is kept).

Ownership: the client draws a secret STREAM_KEY (128 random bits) at each stream's START and sends
it with every chunk of that stream; the server binds the stream to it, so nobody else can feed or
restart the stream. Pick stream ids at random (``new_stream_id()``): ids need not be secret, but a guessable
id lets another client end its Triton sequence.

Retries: only errors that mean the request never reached the model (the server was unreachable) are
retried, at most ``retries`` times with exponential backoff. A chunk the model may already have
consumed is never re-sent, since that would feed the same frames into the stream twice.
"""

from __future__ import annotations

import asyncio
import queue
import secrets
import threading
import time
from concurrent.futures import Future
from typing import Iterable, Iterator, Optional

import numpy as np

from .protocol import (
    DEFAULT_CHUNK, MODEL_NAME, OUTPUT_KEYS, STREAM_ID_HEADER, STREAM_KEY_INPUT, FrameSpec, frame_spec, frames_input, is_decoupled,
    to_uint8_frames,
)

RETRYABLE = ("StatusCode.UNAVAILABLE",)
as_uint8_frames = to_uint8_frames  # the name earlier callers import


def new_stream_id() -> int:
    """A random positive 63-bit sequence id."""
    return secrets.randbits(63) or 1


def new_stream_key() -> np.ndarray:
    """A secret STREAM_KEY input value: [1, 2] int64 (128 random bits)."""
    return np.frombuffer(secrets.token_bytes(16), dtype=np.int64).reshape(1, 2).copy()


class StreamError(RuntimeError):
    """The server refused or failed a chunk, or cannot be reached; the message says which, in one line."""


def _grpc():
    try:
        import tritonclient.grpc as grpcclient
    except ImportError:
        raise StreamError('the client needs tritonclient: pip install "stac-backend[client]" '
                          '(or pip install "tritonclient[grpc]")') from None
    return grpcclient


def explain(exc: BaseException, url: str, stream_id: Optional[int] = None) -> str:
    """One line for a tritonclient error, with a hint where the user can do something about it."""
    status = str(getattr(exc, "status", lambda: "")() or "")
    text = (getattr(exc, "message", lambda: None)() or str(exc) or status).strip()
    message = text.splitlines()[0] if text else type(exc).__name__
    prefix = f"stream {stream_id}: " if stream_id is not None else ""
    if "UNAVAILABLE" in status or "failed to connect" in message.lower() or "connection refused" in message.lower():
        return (f"{prefix}cannot reach a Triton server at {url} ({message}); is it running "
                f"(stac serve) and is --server HOST:PORT its gRPC port (8001 by default)?")
    if "DEADLINE_EXCEEDED" in status:
        return f"{prefix}no answer from {url} in time ({message}); the server may be overloaded: raise the timeout"
    if "Request for unknown model" in message or ("NOT_FOUND" in status and "model" in message):
        return f"{prefix}{message}; check --model-name (the server's models: GET /v2/repository/index)"
    return f"{prefix}{message}"


class StacClient:
    def __init__(self, url: str = "localhost:8001", model: str = MODEL_NAME, retries: int = 3, backoff_s: float = 0.2,
                 timeout_s: Optional[float] = 120.0, ssl: bool = False, root_certificates: Optional[str] = None):
        self._grpc = _grpc()
        self.url = url
        self.model = model
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self._ssl = ssl
        self._root_certificates = root_certificates
        self.client = self._grpc.InferenceServerClient(url, ssl=ssl, root_certificates=root_certificates)
        self._config: Optional[dict] = None  # the model's config, read on first use
        self._keys: dict[int, np.ndarray] = {}  # stream id -> the key drawn at its START
        self._stream_id: Optional[int] = None  # the camera stream the open gRPC stream carries
        self._responses: "queue.Queue" = queue.Queue()

    # ------------------------------------------------------------------ the server's model
    def model_config(self) -> dict:
        """The served model's config (JSON), read once; StreamError (one line) when unreachable."""
        if self._config is None:
            try:
                self._config = dict(self.client.get_model_config(self.model, as_json=True, client_timeout=10.0))
            except self._grpc.InferenceServerException as exc:
                raise StreamError(explain(exc, self.url)) from None
        return self._config

    def frame_spec(self) -> FrameSpec:
        """The frame size and preprocessing the served model expects (its model-config parameters)."""
        return frame_spec(self.model_config())

    def decoupled(self) -> bool:
        """Whether the server's model is decoupled (answers gRPC streams only)."""
        try:
            return is_decoupled(self.model_config())
        except StreamError:
            return False  # not known yet: the request itself will report what is wrong

    # ------------------------------------------------------------------ one request at a time
    def _wanted(self, outputs: Optional[Iterable[str]]) -> dict[str, str]:
        keys = None if outputs is None else set(outputs)
        wanted = {name: key for name, key in OUTPUT_KEYS.items() if keys is None or key in keys}
        unknown = (keys or set()) - set(OUTPUT_KEYS.values())
        if unknown or not wanted:
            raise ValueError(f"unknown or no outputs {sorted(unknown)}; choose from {sorted(OUTPUT_KEYS.values())}")
        return wanted

    def send_chunk(self, stream_id: int, frames, start: bool = False, end: bool = False,
                   outputs: Optional[Iterable[str]] = None) -> dict[str, np.ndarray]:
        """One chunk [C, 3, H, W] of one stream; returns outputs without the batch dimension.

        outputs: the keys wanted (e.g. ``("depth", "pose_enc")``; default all). The server sends only
        those: a 518x392 frame's dense float outputs are ~5 MB, most of it points and confidences.
        """
        inputs = [frames_input(self._grpc, frames)]
        wanted = self._wanted(outputs)
        requested = [self._grpc.InferRequestedOutput(name) for name in wanted]
        if start and int(stream_id) not in self._keys:
            self._keys[int(stream_id)] = new_stream_key()
        key = self._keys.get(int(stream_id))
        if key is not None:
            inputs.append(self._grpc.InferInput(STREAM_KEY_INPUT, [1, 2], "INT64"))
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
                    sequence_end=end, headers={STREAM_ID_HEADER: str(stream_id)}, client_timeout=self.timeout_s,
                )
                break
            except self._grpc.InferenceServerException as exc:
                transient = any(code in str(exc.status()) for code in RETRYABLE)
                if not transient or attempt >= self.retries:
                    raise StreamError(explain(exc, self.url, stream_id)) from None
                time.sleep(self.backoff_s * 2**attempt)
                attempt += 1
        return {key: result.as_numpy(name)[0] for name, key in wanted.items()}

    def _stream_call(self, stream_id: int, inputs, requested, start: bool, end: bool):
        """One request over the camera stream's gRPC stream, waiting for its one response."""
        if self._stream_id != stream_id:
            self._close_stream()
            self._responses = queue.Queue()
            responses = self._responses
            self.client.start_stream(callback=lambda result, error: responses.put((result, error)),
                                     headers={STREAM_ID_HEADER: str(stream_id)})
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
            raise StreamError(explain(exc, self.url, stream_id)) from None
        if error is not None:
            raise StreamError(explain(error, self.url, stream_id))
        if end:
            self._close_stream()
        return result

    def _close_stream(self) -> None:
        if self._stream_id is not None:
            self._stream_id = None
            self.client.stop_stream()

    def stream(self, frames: Iterable, stream_id: int, chunk_size: int = DEFAULT_CHUNK,
               outputs: Optional[Iterable[str]] = None) -> Iterator[dict[str, np.ndarray]]:
        """Send frames [3, H, W] as chunks of ``chunk_size``; START on the first, END on the last.

        A full chunk leaves as soon as the next frame exists (one frame of lookahead tells whether it
        is the last). For a camera that must never wait for results use :meth:`live_stream`."""
        chunk: list[np.ndarray] = []
        first = True
        iterator = iter(frames)
        pending = next(iterator, None)
        while pending is not None:
            chunk.append(to_uint8_frames(pending[None])[0])
            pending = next(iterator, None)
            if len(chunk) == chunk_size or pending is None:
                yield self.send_chunk(stream_id, np.stack(chunk), start=first, end=pending is None, outputs=outputs)
                chunk, first = [], False

    # ------------------------------------------------------------------ pipelined
    def live_stream(self, stream_id: int, max_inflight: int = 2, outputs: Optional[Iterable[str]] = None,
                    chunk_size: int = DEFAULT_CHUNK) -> "LiveStream":
        """A pipelined camera stream (:class:`LiveStream`) on a gRPC stream of its own."""
        return LiveStream(self, int(stream_id), max_inflight=max_inflight, outputs=outputs, chunk_size=chunk_size)

    def is_ready(self) -> bool:
        try:
            return bool(self.client.is_server_ready()) and bool(self.client.is_model_ready(self.model))
        except Exception:  # noqa: BLE001 - unreachable means not ready
            return False

    def close(self) -> None:
        self._close_stream()
        self.client.close()

    def __enter__(self) -> "StacClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LiveStream:
    """One camera stream with up to ``max_inflight`` chunks outstanding; ``submit`` never waits for
    a result (only for a free slot when ``max_inflight`` are already outstanding: back-pressure).

    Results come back in order on tritonclient's stream thread and complete the futures ``submit``
    returned; ``results()`` yields them in order as they complete. The first error fails that
    chunk's future and every later one (the server refuses the rest of a broken stream anyway)."""

    def __init__(self, client: StacClient, stream_id: int, max_inflight: int = 2,
                 outputs: Optional[Iterable[str]] = None, chunk_size: int = DEFAULT_CHUNK):
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        self._grpc = client._grpc
        self.url, self.model, self.stream_id = client.url, client.model, stream_id
        self.chunk_size = chunk_size
        self.timeout_s = client.timeout_s
        self._wanted = client._wanted(outputs)
        self._requested = [self._grpc.InferRequestedOutput(name) for name in self._wanted]
        # A gRPC client carries one stream at a time: this stream gets its own.
        self._client = self._grpc.InferenceServerClient(client.url, ssl=client._ssl,
                                                        root_certificates=client._root_certificates)
        self._slots = threading.Semaphore(max_inflight)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._futures: dict[str, Future] = {}
        self._order: "queue.Queue[Future]" = queue.Queue()
        self._sent = 0  # frames sent so far
        self._last_frame: Optional[np.ndarray] = None
        self._failed: Optional[str] = None
        self._ended = False
        self._key = new_stream_key()  # drawn before the START, so chunks can follow before its answer
        self._client.start_stream(callback=self._on_response, headers={STREAM_ID_HEADER: str(stream_id)})

    def submit(self, frames, end: bool = False, _listed: bool = True) -> Future:
        """Send one chunk [C, 3, H, W] (uint8 RGB or float in [0, 1]); returns its future at once.
        ``end=True`` marks the stream's last chunk (or call :meth:`close` later)."""
        data = to_uint8_frames(frames)
        with self._send_lock:  # chunks leave in the order of the calls, one at a time
            return self._submit(data, end, _listed)

    def _submit(self, data: np.ndarray, end: bool, listed: bool) -> Future:
        if self._ended:
            raise StreamError(f"stream {self.stream_id}: already ended")
        future: Future = Future()
        if self._failed is not None:
            future.set_exception(StreamError(self._failed))
            return future
        if not self._slots.acquire(timeout=self.timeout_s):
            raise StreamError(f"stream {self.stream_id}: {self._inflight()} chunks unanswered for {self.timeout_s} s")
        request_id = str(self._sent)
        with self._lock:
            self._futures[request_id] = future
        if listed:
            self._order.put(future)
        try:
            key = self._grpc.InferInput(STREAM_KEY_INPUT, [1, 2], "INT64")
            key.set_data_from_numpy(self._key)
            self._client.async_stream_infer(
                self.model, [frames_input(self._grpc, data), key], outputs=self._requested, request_id=request_id,
                sequence_id=self.stream_id, sequence_start=self._sent == 0, sequence_end=end)
        except self._grpc.InferenceServerException as exc:
            self._fail(explain(exc, self.url, self.stream_id))
        self._sent += len(data)
        self._last_frame = data[-1:]
        self._ended = end
        return future

    async def asend(self, frames, end: bool = False) -> "asyncio.Future":
        """``submit`` for asyncio: returns once the chunk is sent (waiting, off the event loop, only
        for a free slot) with an awaitable of its result. Await the sends in the camera's order::

            pending = [await live.asend(chunk) for chunk in ...]   # or one per captured chunk
            out = await pending[0]
        """
        loop = asyncio.get_running_loop()
        future = await loop.run_in_executor(None, self.submit, frames, end)
        return asyncio.wrap_future(future)

    async def asubmit(self, frames, end: bool = False) -> dict[str, np.ndarray]:
        """Send one chunk and await its result (no pipelining: use ``asend`` for that)."""
        return await (await self.asend(frames, end))

    def results(self, timeout_s: Optional[float] = None) -> Iterator[dict[str, np.ndarray]]:
        """The results of submitted chunks, in order, as they complete; stops when none is pending."""
        while True:
            try:
                future = self._order.get_nowait()
            except queue.Empty:
                return
            yield future.result(timeout=timeout_s if timeout_s is not None else self.timeout_s)

    def close(self) -> None:
        """End the stream (frees its state on the server now, not at the idle TTL) and wait for the
        outstanding results. Without a chunk sent with ``end=True``, the last frame goes again with
        END and that one result is dropped."""
        try:
            if not self._ended and self._last_frame is not None and self._failed is None:
                self.submit(self._last_frame, end=True, _listed=False)  # nobody asked for the repeat's result
            for future in list(self._futures.values()):
                try:
                    future.result(timeout=self.timeout_s)
                except Exception:  # noqa: BLE001 - reported through the futures the caller holds
                    pass
        finally:
            self._ended = True
            self._client.stop_stream()
            self._client.close()

    def __enter__(self) -> "LiveStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _inflight(self) -> int:
        with self._lock:
            return len(self._futures)

    def _on_response(self, result, error) -> None:
        """tritonclient's stream thread: complete the request's future."""
        if error is not None:
            self._fail(explain(error, self.url, self.stream_id))
            return
        request_id = result.get_response().id
        with self._lock:
            future = self._futures.pop(request_id, None)
        self._slots.release()
        if future is not None:
            future.set_result({key: result.as_numpy(name)[0] for name, key in self._wanted.items()})

    def _fail(self, message: str) -> None:
        """Fail every outstanding future (the stream is broken from here on)."""
        with self._lock:
            self._failed = self._failed or message
            futures, self._futures = list(self._futures.values()), {}
        for future in futures:
            if not future.done():
                future.set_exception(StreamError(self._failed))
            self._slots.release()
