"""Fleet load for the ``stac`` model: many concurrent camera streams over gRPC, and the replicas behind them.

One module of ~900 lines on purpose: the paced and pipelined senders, restarts, progress line and
results all read and write the same per-stream record, and splitting them would spread that record's
rules over several files.

Client side (``stac fleet``)::

    stac fleet --server localhost:8001 --streams 8 --frames 64 --fps 15 --out docs/benchmarks/fleet_cpu.json
    stac fleet --local --streams 8 --frames 64                 # starts a local tritonserver (tiny model, CPU)

``run_fleet(FleetConfig(...))`` opens N streams at once on one asyncio event loop
(``tritonclient.grpc.aio``). Each stream is one Triton sequence: its frames go out in chunks, START
on the first and END on the last, every request carrying the stream id also as an ``x-stream-id``
header so a proxy (NGINX ``hash $http_x_stream_id consistent``) keeps the stream on one replica.
Streams are paced like cameras (``fps``: a chunk leaves when its last frame has been "captured")
or sent as fast as the server answers (``fps=None``). Frames come from the synthetic scene
generator (a different seed per stream) or are random.

Restarts: when a request fails because the stream's replica died or cannot be reached
(``UNAVAILABLE``, e.g. NGINX's 502), timed out (its state is unknown), or the server no longer
knows the stream (``unknown stream`` / ``must specify the START flag``: a proxy moved it to another
replica), the stream starts again with a new START at the chunk that failed - a camera cannot
rewind - and carries on. Each restart is counted with its reason; frame indices restart at 0 in
the new segment. Any other error (bad input, admission refusal) ends that stream and is counted
as an error.

Pipelining (``inflight``): with ``inflight == 1`` a stream sends a chunk and waits for its result
before the next (unary requests, restarts as above). A real camera does not wait, and on a GPU that
lockstep leaves it idle while results travel back and the next batch forms. ``inflight > 1`` keeps
up to that many requests of a stream outstanding on ONE bidirectional gRPC stream
(``stream_infer``), so the chunks reach Triton's sequence batcher in order by construction; the
batcher (``oldest``) still runs a sequence's requests one after the other. inflight > 1: no
restarts; a failed request ends the stream. Through the NGINX proxy the whole gRPC stream is one
request body; the proxy's streaming location caps it at ``NginxConfig.stream_max_body`` (none by
default), unary chunks at ``max_body``.

Decoupled servers (``ServeSettings.decoupled``) answer gRPC streams only; the fleet asks the
server's model config and then streams every camera (the pipelined path, ``inflight`` as set).

Result: per-stream and aggregate frames/s, request latency p50/p90/p99 (and, when paced, the
capture-to-result latency), errors, restarts, frame-index continuity; JSON via ``--out``, a
table on stdout, a live progress line on stderr, an optional plot (matplotlib, if installed).

Replicas behind a proxy: ``stac_backend.tools.nginx`` (NGINX with consistent hashing on
``x-stream-id``, as production routes). :func:`start_local_server` starts a tritonserver with the
tiny model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

__all__ = [
    "FleetConfig",
    "StreamRecord",
    "FleetResult",
    "run_fleet",
    "make_frames",
    "classify_error",
    "scrape_metrics",
    "start_local_server",
    "parse_budget",
    "stream_bound_bytes",
    "register",
    "main",
]

OUTPUT_NAMES = (
    "DEPTH", "DEPTH_CONF", "WORLD_POINTS", "WORLD_POINTS_CONF", "POSE_ENC", "EXTRINSICS", "INTRINSICS",
    "FRAME_INDEX", "CACHE_BYTES",
)
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# gRPC channel options: never go through an http(s)_proxy from the environment; allow large responses.
CHANNEL_ARGS = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


# ======================================================================================
# Frames
# ======================================================================================


def make_frames(seed: int, frames: int, height: int, width: int, source: str = "synthetic",
                scene_frames: int = 96, device: str = "cpu") -> np.ndarray:
    """uint8 [frames, 3, H, W] for one stream.

    ``synthetic``: a procedural room rendered along a loop trajectory (``stac_backend.data``),
    ``min(frames, scene_frames)`` frames rendered and played back and forth (ping-pong) when the
    stream is longer, so a long stream stays a continuous camera path without rendering every
    frame. ``random``: uniform noise.
    """
    if source == "random":
        return np.random.default_rng(seed).integers(0, 256, (frames, 3, height, width), dtype=np.uint8)
    if source != "synthetic":
        raise ValueError(f"source must be 'synthetic' or 'random', got {source!r}")
    import torch

    from ..data import make_sequence

    rendered = max(1, min(frames, scene_frames))
    seq = make_sequence(rendered, height, width, trajectory="loop", seed=seed, device=device)  # device: where to ray-cast
    images = (seq.images.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()
    if rendered == frames:
        return np.ascontiguousarray(images)
    period = max(1, 2 * rendered - 2)
    order = [(i % period) if (i % period) < rendered else period - (i % period) for i in range(frames)]
    return np.ascontiguousarray(images[order])


# ======================================================================================
# The client fleet
# ======================================================================================


@dataclass
class FleetConfig:
    url: str = "localhost:8001"
    model: str = "stac"
    streams: int = 8
    frames: int = 64  # per stream
    chunk: int = 4
    height: int = 56
    width: int = 84
    fps: Optional[float] = None  # per stream; None = as fast as the server answers
    source: str = "synthetic"  # synthetic | random
    scene_frames: int = 96  # synthetic: frames rendered per stream (then played back and forth)
    seed: int = 0  # stream k uses seed + k
    first_stream_id: int = 1
    stream_ids: Optional[list[int]] = None  # explicit ids (overrides first_stream_id)
    max_restarts: int = 3  # per stream (the unary path only: inflight 1 against a unary server)
    restart_backoff_s: float = 0.2
    request_timeout_s: float = 120.0
    connections: int = 1  # gRPC channels the streams are spread over
    # Most requests one stream has outstanding. 1: send, wait for the result, send the next (unary
    # calls, restarts). > 1: one bidirectional gRPC stream per camera stream, no restarts (a failed
    # request ends the stream).
    inflight: int = 1
    # One bidirectional gRPC stream per camera stream even at inflight 1 (the pipelined path).
    # A decoupled server (ServeSettings.decoupled) answers only streams; None = ask the server.
    streaming: Optional[bool] = None
    keep_outputs: bool = False  # keep every response's arrays (tests compare them)
    progress: bool = True
    progress_interval_s: float = 1.0
    ssl: bool = False
    root_certificates: Optional[str] = None
    metrics_urls: list[str] = field(default_factory=list)  # Triton /metrics endpoints to diff before/after

    def ids(self) -> list[int]:
        ids = list(self.stream_ids) if self.stream_ids is not None else [self.first_stream_id + k for k in range(self.streams)]
        if len(ids) != self.streams:
            raise ValueError(f"{len(ids)} stream ids given for {self.streams} streams")
        if len(set(ids)) != len(ids) or any(not 0 < i < 2**63 for i in ids):
            raise ValueError("stream ids must be distinct integers in [1, 2**63)")
        return ids

    def validate(self) -> None:
        if self.streams < 1 or self.frames < 1 or self.chunk < 1:
            raise ValueError("streams, frames and chunk must be positive")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.height % 14 or self.width % 14:
            raise ValueError(f"height and width must be multiples of 14, got {self.height}x{self.width}")
        if self.inflight < 1:
            raise ValueError(f"inflight (requests outstanding per stream) must be at least 1, got {self.inflight}")
        self.ids()


@dataclass
class StreamRecord:
    stream_id: int
    seed: int
    frames_total: int
    frames_done: int = 0
    requests: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    e2e_latencies_ms: list[float] = field(default_factory=list)  # capture of the chunk's last frame -> result
    send_times: list[float] = field(default_factory=list)  # seconds since the fleet started
    errors: list[str] = field(default_factory=list)
    restarts: int = 0
    restart_reasons: list[str] = field(default_factory=list)
    segments: list[int] = field(default_factory=lambda: [0])  # first frame of each (re)started segment
    index_breaks: int = 0  # responses whose FRAME_INDEX did not continue the segment
    cache_bytes: int = 0
    started_s: Optional[float] = None
    finished_s: Optional[float] = None
    completed: bool = False
    outputs: list[dict[str, Any]] = field(default_factory=list)  # keep_outputs: per chunk
    # The stream's secret, sent with every chunk (the server binds the stream to it at START).
    key: np.ndarray = field(default_factory=lambda: np.frombuffer(os.urandom(16), dtype=np.int64).reshape(1, 2).copy())

    def summary(self) -> dict[str, Any]:
        wall = (self.finished_s - self.started_s) if self.started_s is not None and self.finished_s is not None else 0.0
        return {
            "stream_id": self.stream_id,
            "seed": self.seed,
            "frames": self.frames_done,
            "frames_total": self.frames_total,
            "completed": self.completed,
            "requests": self.requests,
            "seconds": round(wall, 4),
            "frames_per_second": round(self.frames_done / wall, 3) if wall > 0 else 0.0,
            "latency_ms": percentiles(self.latencies_ms),
            "e2e_latency_ms": percentiles(self.e2e_latencies_ms),
            "errors": len(self.errors),
            "error_messages": self.errors[:5],
            "restarts": self.restarts,
            "restart_reasons": self.restart_reasons[:5],
            "segments": self.segments,
            "index_breaks": self.index_breaks,
            "cache_bytes": self.cache_bytes,
        }


@dataclass
class FleetResult:
    config: FleetConfig
    streams: list[StreamRecord]
    wall_s: float
    started_at: float  # unix time
    server_metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return sum(len(s.errors) for s in self.streams)

    @property
    def restarts(self) -> int:
        return sum(s.restarts for s in self.streams)

    def aggregate(self) -> dict[str, Any]:
        frames = sum(s.frames_done for s in self.streams)
        lat = [x for s in self.streams for x in s.latencies_ms]
        e2e = [x for s in self.streams for x in s.e2e_latencies_ms]
        per_stream_fps = [s.summary()["frames_per_second"] for s in self.streams]
        return {
            "streams": len(self.streams),
            "streams_completed": sum(s.completed for s in self.streams),
            "frames": frames,
            "requests": sum(s.requests for s in self.streams),
            "seconds": round(self.wall_s, 4),
            "frames_per_second": round(frames / self.wall_s, 3) if self.wall_s > 0 else 0.0,
            "per_stream_frames_per_second": percentiles(per_stream_fps, digits=3) | {"min": min(per_stream_fps, default=0.0)},
            "target_frames_per_second_per_stream": self.config.fps,
            "latency_ms": percentiles(lat),
            "e2e_latency_ms": percentiles(e2e),
            "errors": self.errors,
            "restarts": self.restarts,
            "index_breaks": sum(s.index_breaks for s in self.streams),
        }

    def to_json(self) -> dict[str, Any]:
        config = asdict(self.config)
        config.pop("root_certificates", None)
        return {
            "kind": "fleet",
            "config": config,
            "environment": environment(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started_at)),
            "aggregate": self.aggregate(),
            "streams": [s.summary() for s in self.streams],
            "server_metrics": self.server_metrics,
        }

    def table(self) -> str:
        rows = [("stream", "frames", "fps", "p50 ms", "p90 ms", "p99 ms", "errors", "restarts")]
        for s in self.streams:
            d = s.summary()
            lat = d["latency_ms"]
            rows.append((str(s.stream_id), f"{d['frames']}/{d['frames_total']}", f"{d['frames_per_second']:.2f}",
                         _fmt(lat.get("p50")), _fmt(lat.get("p90")), _fmt(lat.get("p99")), str(d["errors"]), str(d["restarts"])))
        a = self.aggregate()
        lat = a["latency_ms"]
        rows.append(("all", f"{a['frames']}", f"{a['frames_per_second']:.2f}", _fmt(lat.get("p50")), _fmt(lat.get("p90")),
                     _fmt(lat.get("p99")), str(a["errors"]), str(a["restarts"])))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def percentiles(values: Sequence[float], digits: int = 2) -> dict[str, float]:
    if not len(values):
        return {}
    arr = np.asarray(values, dtype=np.float64)
    out = {f"p{q}": round(float(np.percentile(arr, q)), digits) for q in (50, 90, 99)}
    out["mean"] = round(float(arr.mean()), digits)
    out["max"] = round(float(arr.max()), digits)
    return out


def environment() -> dict[str, Any]:
    return {
        "host": platform.node(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


#: Error kinds after which a stream restarts with a new START (all others end the stream).
RESTART_KINDS = ("unavailable", "timeout", "unknown_stream")


def classify_error(status: Optional[str], message: str) -> str:
    """``unavailable`` (replica died / unreachable), ``timeout`` (state unknown), ``unknown_stream``
    (the server no longer holds this stream: it was moved, ended or expired), or ``error``."""
    status = status or ""
    text = message or ""
    if "UNAVAILABLE" in status or "failed to connect" in text.lower():
        return "unavailable"
    if "DEADLINE_EXCEEDED" in status:
        return "timeout"
    if "unknown stream" in text or "must specify the START flag" in text:
        return "unknown_stream"
    return "error"


class _Progress:
    def __init__(self, result_streams: list[StreamRecord], total_frames: int, t0: float, interval: float, enabled: bool):
        self.streams, self.total, self.t0, self.interval, self.enabled = result_streams, total_frames, t0, interval, enabled
        self.tty = sys.stderr.isatty()
        self._last_line = 0.0

    def line(self) -> str:
        now = time.perf_counter() - self.t0
        done = sum(s.frames_done for s in self.streams)
        live = sum(1 for s in self.streams if s.started_s is not None and s.finished_s is None)
        recent = [x for s in self.streams for x in s.latencies_ms[-8:]]
        p50 = f"{np.percentile(recent, 50):.0f}" if recent else "-"
        return (f"[fleet] {now:6.1f}s  live {live}/{len(self.streams)}  frames {done}/{self.total}  "
                f"{done / max(now, 1e-9):6.1f} fps  p50 {p50} ms  errors {sum(len(s.errors) for s in self.streams)}  "
                f"restarts {sum(s.restarts for s in self.streams)}")

    async def run(self) -> None:
        if not self.enabled:
            return
        try:
            while True:
                await asyncio.sleep(self.interval)
                self.emit()
        except asyncio.CancelledError:
            pass

    def emit(self, final: bool = False) -> None:
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\r" + self.line() + ("\n" if final else ""))
        elif final or time.perf_counter() - self._last_line >= max(5.0, self.interval):
            sys.stderr.write(self.line() + "\n")
            self._last_line = time.perf_counter()
        sys.stderr.flush()


async def _run_stream(client, grpc, config: FleetConfig, record: StreamRecord, frames: np.ndarray, t0: float,
                      phase_s: float, on_chunk: Optional[Callable[[StreamRecord, dict], Any]]) -> None:
    from tritonclient.utils import InferenceServerException

    loop_start = t0 + phase_s
    outputs = [grpc.InferRequestedOutput(name) for name in OUTPUT_NAMES]
    headers = {"x-stream-id": str(record.stream_id)}
    i, start, segment_start = 0, True, 0
    n = len(frames)
    if config.fps is None:
        await asyncio.sleep(phase_s)
    record.started_s = time.perf_counter() - t0
    while i < n:
        c = min(config.chunk, n - i)
        end = i + c >= n
        if config.fps is not None:
            capture = loop_start + (i + c) / config.fps  # the chunk's last frame exists from then on
            delay = capture - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        else:
            capture = time.perf_counter()
        data = frames[None, i : i + c]
        inputs = [grpc.InferInput("FRAMES", list(data.shape), "UINT8"), grpc.InferInput("STREAM_KEY", [1, 2], "INT64")]
        inputs[0].set_data_from_numpy(data)
        inputs[1].set_data_from_numpy(record.key)
        sent = time.perf_counter()
        try:
            result = await client.infer(
                config.model, inputs, outputs=outputs, sequence_id=record.stream_id, sequence_start=start,
                sequence_end=end, headers=headers, client_timeout=config.request_timeout_s,
            )
        except InferenceServerException as exc:
            message = f"{exc.status() or ''} {exc.message() or ''}".strip()
            kind = classify_error(exc.status(), exc.message() or "")
            if kind in RESTART_KINDS and record.restarts < config.max_restarts:
                record.restarts += 1
                record.restart_reasons.append(f"frame {i}: {kind}: {message}")
                start, segment_start = True, i
                if record.segments[-1] != i:
                    record.segments.append(i)
                await asyncio.sleep(config.restart_backoff_s * 2 ** (record.restarts - 1))
                continue
            record.errors.append(f"frame {i}: {kind}: {message}")
            break
        done = time.perf_counter()
        await _record_response(config, record, result, i, c, capture, sent, done, t0, on_chunk, segment_start)
        i += c
        start = False
    record.completed = i >= n and not record.errors
    record.finished_s = time.perf_counter() - t0


class _Pipeline:
    """What one pipelined stream's request generator and its response loop share.

    gRPC pulls the generator from its own task; the response loop runs in the stream's task. To
    stop the generator whatever it is doing, the loop reads ``state``: ``new`` (never pulled),
    ``waiting`` (in a wait that ``stop`` interrupts: for a slot or for a capture time), ``parked``
    (at its ``yield``, until gRPC takes the request) or ``done``.
    """

    def __init__(self, inflight: int):
        self.slots = asyncio.Semaphore(inflight)  # one per request allowed outstanding
        self.sent: asyncio.Queue = asyncio.Queue()  # (first frame, frames, capture, sent) per request; None: no more
        self.stop = asyncio.Event()
        self.state = "new"
        self.finished = asyncio.Event()
        self.failure: Optional[str] = None  # why the generator ended before the last chunk


async def _pipelined_requests(pipe: _Pipeline, grpc, config: FleetConfig, record: StreamRecord, frames: np.ndarray,
                              loop_start: float, outputs: list):
    """The stream's requests for ``stream_infer``, chunk by chunk, each only once a slot is free
    and (paced) once its last frame has been captured."""
    n = len(frames)
    try:
        for i in range(0, n, config.chunk):
            c = min(config.chunk, n - i)
            pipe.state = "waiting"
            await pipe.slots.acquire()
            if pipe.stop.is_set():
                return
            if config.fps is not None:
                capture = loop_start + (i + c) / config.fps  # the same pacing as the unary path
                delay = capture - time.perf_counter()
                if delay > 0:
                    try:
                        await asyncio.wait_for(pipe.stop.wait(), delay)
                    except asyncio.TimeoutError:
                        pass
                    if pipe.stop.is_set():
                        return
            else:
                capture = time.perf_counter()
            try:
                data = frames[None, i : i + c]
                inputs = [grpc.InferInput("FRAMES", list(data.shape), "UINT8"),
                          grpc.InferInput("STREAM_KEY", [1, 2], "INT64")]
                inputs[0].set_data_from_numpy(data)
                inputs[1].set_data_from_numpy(record.key)
            except Exception as exc:  # raised into gRPC it would only cancel the call, without a word
                pipe.failure = f"frame {i}: error: cannot build the request: {exc}"
                return
            pipe.sent.put_nowait((i, c, capture, time.perf_counter()))
            pipe.state = "parked"
            yield {
                "model_name": config.model, "inputs": inputs, "outputs": outputs, "request_id": str(i),
                "sequence_id": record.stream_id, "sequence_start": i == 0, "sequence_end": i + c >= n,
            }
    finally:
        pipe.state = "done"
        pipe.sent.put_nowait(None)  # wakes a response loop that waits for a request never to be sent
        pipe.finished.set()


async def _next_response(responses, sent: float, timeout_s: float):
    """The next ``(result, error)`` of the gRPC stream, within ``timeout_s`` of the request's send."""
    return await asyncio.wait_for(responses.__anext__(), max(0.0, sent + timeout_s - time.perf_counter()))


async def _close_pipeline(pipe: _Pipeline, requests, responses, clean: bool) -> None:
    """Leave nothing running: the gRPC call over, the request generator finished."""
    from grpc import RpcError

    pipe.stop.set()
    pipe.slots.release()  # wakes a generator waiting for a slot; it sees ``stop`` and returns
    if clean:
        # Every request answered and the generator returned after END (gRPC half-closed the
        # stream): the server ends the stream now; read that end instead of cancelling.
        try:
            await asyncio.wait_for(responses.__anext__(), 5.0)
        except (StopAsyncIteration, asyncio.TimeoutError, RpcError):
            pass
    responses.cancel()  # no-op once the call is over; else it also cancels gRPC's request-pulling task
    if pipe.state in ("new", "parked"):
        await requests.aclose()  # nobody will pull it again
    elif pipe.state == "waiting":
        try:  # it wakes on ``stop`` (or on the cancellation above) and returns
            await asyncio.wait_for(pipe.finished.wait(), 5.0)
        except asyncio.TimeoutError:
            pass


async def _run_stream_pipelined(client, grpc, config: FleetConfig, record: StreamRecord, frames: np.ndarray, t0: float,
                                phase_s: float, on_chunk: Optional[Callable[[StreamRecord, dict], Any]]) -> None:
    """``inflight > 1``: up to ``config.inflight`` requests outstanding on one bidirectional gRPC
    stream (order within the camera stream guaranteed by the stream); no restarts: the first
    failed request ends the stream."""
    from grpc import RpcError
    from tritonclient.utils import InferenceServerException

    outputs = [grpc.InferRequestedOutput(name) for name in OUTPUT_NAMES]
    headers = {"x-stream-id": str(record.stream_id)}
    n = len(frames)
    if config.fps is None:
        await asyncio.sleep(phase_s)
    record.started_s = time.perf_counter() - t0
    pipe = _Pipeline(config.inflight)
    requests = _pipelined_requests(pipe, grpc, config, record, frames, t0 + phase_s, outputs)
    responses = None
    try:
        responses = client.stream_infer(requests, headers=headers)
        while record.frames_done < n:
            request = await pipe.sent.get()
            if request is None:  # the generator ended early: stopped, or could not build a request
                record.errors.append(pipe.failure or f"frame {record.frames_done}: error: request stream ended early")
                break
            i, c, capture, sent = request
            try:
                result, error = await _next_response(responses, sent, config.request_timeout_s)
            except StopAsyncIteration:
                error = InferenceServerException(msg="the server closed the stream before answering")
            except asyncio.TimeoutError:
                error = InferenceServerException(msg=f"no response within {config.request_timeout_s} s",
                                                 status="StatusCode.DEADLINE_EXCEEDED")
            except RpcError as exc:  # the whole call failed (server gone, proxy error): gRPC's own error
                error = InferenceServerException(msg=exc.details() or "", status=str(exc.code()))
            done = time.perf_counter()
            pipe.slots.release()
            if error is None and result.get_response().id != str(i):
                error = InferenceServerException(msg=f"response {result.get_response().id!r} arrived for request {i}")
            if error is not None:
                message = f"{error.status() or ''} {error.message() or ''}".strip()
                record.errors.append(f"frame {i}: {classify_error(error.status(), error.message() or '')}: {message}")
                break
            await _record_response(config, record, result, i, c, capture, sent, done, t0, on_chunk)
    finally:
        if responses is not None:
            await _close_pipeline(pipe, requests, responses, clean=record.frames_done >= n and not record.errors)
        else:
            await requests.aclose()
    record.completed = record.frames_done >= n and not record.errors
    record.finished_s = time.perf_counter() - t0


async def _record_response(config: FleetConfig, record: StreamRecord, result, i: int, c: int, capture: float,
                           sent: float, done: float, t0: float,
                           on_chunk: Optional[Callable[[StreamRecord, dict], Any]], segment_start: int = 0) -> None:
    """Book one successful response of chunk ``[i, i + c)``; frame indices restart at 0 in each
    (re)started segment (pipelined streams have one segment: no restarts)."""
    record.requests += 1
    record.latencies_ms.append((done - sent) * 1000)
    record.send_times.append(sent - t0)
    if config.fps is not None:
        record.e2e_latencies_ms.append((done - capture) * 1000)
    index = result.as_numpy("FRAME_INDEX")[0]
    if index.tolist() != list(range(i - segment_start, i - segment_start + c)):
        record.index_breaks += 1
    record.cache_bytes = int(result.as_numpy("CACHE_BYTES").reshape(-1)[0])
    chunk_out = None  # handed to on_chunk too (None unless keep_outputs)
    if config.keep_outputs:
        chunk_out = {name.lower(): result.as_numpy(name)[0] for name in OUTPUT_NAMES}
        chunk_out.update(first_frame=i, segment_start=segment_start)
        record.outputs.append(chunk_out)
    record.frames_done += c
    if on_chunk is not None:
        maybe = on_chunk(record, chunk_out)
        if asyncio.iscoroutine(maybe):
            await maybe


async def run_fleet_async(config: FleetConfig, frames: Optional[dict[int, np.ndarray]] = None,
                          on_chunk: Optional[Callable[[StreamRecord, dict], Any]] = None) -> FleetResult:
    """Run the fleet; ``frames`` maps stream id -> uint8 [M, 3, H, W] (generated when missing)."""
    import tritonclient.grpc as grpc
    import tritonclient.grpc.aio as grpc_aio

    config.validate()
    ids = config.ids()
    if frames is None:
        frames = {}
    for k, sid in enumerate(ids):
        if sid not in frames:
            frames[sid] = make_frames(config.seed + k, config.frames, config.height, config.width, config.source,
                                      config.scene_frames)
    records = [StreamRecord(sid, config.seed + k, len(frames[sid])) for k, sid in enumerate(ids)]
    root = None
    if config.root_certificates:
        root = Path(config.root_certificates).read_bytes()
    clients = [grpc_aio.InferenceServerClient(config.url, ssl=config.ssl, root_certificates=root, channel_args=CHANNEL_ARGS)
               for _ in range(max(1, config.connections))]
    streaming = config.streaming
    if streaming is None:  # asked before the clock starts
        streaming = await server_is_decoupled(clients[0], config.model)
    before = {u: scrape_metrics(u) for u in config.metrics_urls}
    started_at = time.time()
    t0 = time.perf_counter()
    # Stagger the streams' first chunks over one chunk period so they do not fire in lockstep.
    period = (config.chunk / config.fps) if config.fps else 0.05
    rng = np.random.default_rng(config.seed)
    phases = rng.uniform(0, period, len(ids)) if len(ids) > 1 else [0.0]
    progress = _Progress(records, sum(r.frames_total for r in records), t0, config.progress_interval_s, config.progress)
    ticker = asyncio.ensure_future(progress.run())
    run_stream = _run_stream if config.inflight == 1 and not streaming else _run_stream_pipelined
    try:
        await asyncio.gather(*[
            run_stream(clients[k % len(clients)], grpc, config, rec, frames[rec.stream_id], t0, float(phases[k]), on_chunk)
            for k, rec in enumerate(records)
        ])
    finally:
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)
        for c in clients:
            await c.close()
    wall = max((r.finished_s or 0.0) for r in records) - min((r.started_s or 0.0) for r in records)
    progress.emit(final=True)
    server_metrics = {}
    for u in config.metrics_urls:
        after = scrape_metrics(u)
        server_metrics[u] = {k: after.get(k, 0.0) - before[u].get(k, 0.0) for k in sorted(set(after) | set(before[u]))
                             if k.startswith(("stac_", "nv_inference_"))}
    return FleetResult(config, records, wall, started_at, server_metrics)


async def server_is_decoupled(client, model: str) -> bool:
    """Whether ``model`` has the decoupled transaction policy (it then answers gRPC streams only).
    False when the config cannot be read: the requests themselves will then say what is wrong."""
    from ..protocol import is_decoupled

    try:
        reply = await client.get_model_config(model, as_json=True)
    except Exception:  # noqa: BLE001 - unreachable or unknown model
        return False
    return is_decoupled(reply)


def run_fleet(config: FleetConfig, frames: Optional[dict[int, np.ndarray]] = None,
              on_chunk: Optional[Callable[[StreamRecord, dict], Any]] = None) -> FleetResult:
    return asyncio.run(run_fleet_async(config, frames, on_chunk))


# ======================================================================================
# Server-side helpers: metrics, local server
# ======================================================================================

_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfINFNaN]+)$")


def scrape_metrics(url: str, timeout: float = 10.0, by_label: bool = False) -> dict[str, float]:
    """Prometheus text from ``url`` -> {metric name: sum over label sets} (or {name{labels}: value})."""
    text = NO_PROXY.open(url, timeout=timeout).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _METRIC_LINE.match(line.strip())
        if not m:
            continue
        key = m.group(1) + (m.group(2) or "") if by_label else m.group(1)
        try:
            values[key] = values.get(key, 0.0) + float(m.group(3))
        except ValueError:
            continue
    return values


def start_local_server(workdir: Path, *, device: str = "cpu", checkpoint: Optional[Path] = None,
                       threads: Optional[int] = None, max_streams: int = 64, log_callback=None,
                       http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0,
                       extra_args: Sequence[str] = (), die_with_parent: bool = True, wait: bool = True,
                       restricted_protocols: Optional[Sequence[str]] = None, **settings):
    """``serving.repository.local_server`` with the load generator's defaults: the tiny preset on CPU
    (``device="cuda"``: a KIND_GPU instance), 64 streams; ``settings`` are ``ServeSettings`` fields
    (``cache_config``, ``idle_ttl_s``, ``decoupled``, ...). Returns the started server."""
    from ..serving.repository import local_server
    from ..serving.settings import ServeSettings

    settings.setdefault("preset", "" if checkpoint else "tiny")
    options = {} if restricted_protocols is None else {"restricted_protocols": restricted_protocols}
    return local_server(ServeSettings.on_device(device, max_streams=max_streams, **settings), workdir, checkpoint,
                        threads=threads, start=wait, http_port=http_port, grpc_port=grpc_port,
                        metrics_port=metrics_port, log_callback=log_callback, extra_args=list(extra_args),
                        die_with_parent=die_with_parent, **options)


def process_tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, todo, page = 0, [pid], os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, ValueError, IndexError):
            pass
        todo.extend(children.get(p, []))
    return total


# Cache budgets (capacity sweeps)

UNITS = {"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}


def parse_budget(text: str) -> tuple[str, dict]:
    """``window`` | ``stac`` | ``stac:4MiB`` (memory_budget_bytes) -> (label, cache config)."""
    m = re.fullmatch(r"([a-z_]+)(?::([0-9.]+)\s*([KMG]iB|B)?)?", text.strip(), re.I)
    if not m:
        raise ValueError(f"bad budget {text!r}: POLICY or POLICY:SIZE (e.g. stac:4MiB)")
    policy, size, unit = m.group(1), m.group(2), (m.group(3) or "B").upper()
    config = {"policy": policy}
    if size:
        config["memory_budget_bytes"] = int(float(size) * UNITS[unit])
    return text.strip(), config


def stream_bound_bytes(preset: str, height: int, width: int, cache: dict, dtype: str) -> int | None:
    """The cache code's exact per-stream bound (from the configurations: no model is built)."""
    import torch

    from stac_backend.cache import CacheConfig
    from stac_backend.engine import stream_memory_bound
    from stac_backend.model.config import get_preset

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return stream_memory_bound(get_preset(preset), CacheConfig(**cache), (height, width), torch_dtype)



# ======================================================================================
# Plot and command line
# ======================================================================================


def plot(result: FleetResult, path: Path) -> Optional[Path]:
    """Latency over time per stream and the fleet's frames/s; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for s in result.streams:
        ax1.plot(s.send_times, s.latencies_ms, ".", ms=2)
    ax1.set_ylabel("request latency (ms)")
    times = np.sort(np.concatenate([np.asarray(s.send_times) for s in result.streams if s.send_times] or [np.zeros(0)]))
    if len(times):
        bins = np.arange(0, times[-1] + 1.0, 1.0)
        counts, edges = np.histogram(times, bins=bins)
        ax2.step(edges[:-1], counts * result.config.chunk, where="post")
    ax2.set_ylabel("frames/s (sent)")
    ax2.set_xlabel("seconds")
    a = result.aggregate()
    fig.suptitle(f"{a['streams']} streams: {a['frames_per_second']:.1f} frames/s, p50 {a['latency_ms'].get('p50', 0):.0f} ms, "
                 f"errors {a['errors']}, restarts {a['restarts']}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"size must be HxW (e.g. 56x84), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``stac fleet`` to an argparse subparsers object."""
    p = subparsers.add_parser("fleet", help="N concurrent camera streams through a Triton server (load test)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default="localhost:8001", help="gRPC HOST:PORT (a Triton server or the NGINX in front)")
    p.add_argument("--local", action="store_true", help="start a local tritonserver (tiny model, CPU) for the run")
    p.add_argument("--model-name", default="stac")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--frames", type=int, default=64, help="frames per stream")
    p.add_argument("--chunk", type=int, default=4, help="frames per request")
    p.add_argument("--size", type=_size, default=(56, 84), help="HxW, multiples of 14 (default 56x84)")
    p.add_argument("--fps", type=float, default=None, help="per-stream camera rate (default: as fast as possible)")
    p.add_argument("--source", choices=("synthetic", "random"), default="synthetic")
    p.add_argument("--scene-frames", type=int, default=96, help="synthetic: frames rendered per stream, then replayed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first-stream-id", type=int, default=1)
    p.add_argument("--max-restarts", type=int, default=3)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--connections", type=int, default=1, help="gRPC channels to spread the streams over")
    p.add_argument("--inflight", type=int, default=1,
                   help="requests one stream keeps outstanding (default 1: wait for each result); >1 pipelines the "
                        "chunks over one bidirectional gRPC stream per camera, without restarts")
    p.add_argument("--streaming", choices=("auto", "yes", "no"), default="auto",
                   help="one gRPC stream per camera even at --inflight 1 (auto: when the server's model is decoupled)")
    p.add_argument("--metrics-url", action="append", default=[], help="Triton /metrics URL to diff (repeatable)")
    p.add_argument("--ssl", action="store_true", help="gRPC over TLS")
    p.add_argument("--root-certificates", default=None, help="CA bundle for --ssl")
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--policy", default="stac", help="--local: cache policy")
    p.add_argument("--max-streams", type=int, default=64, help="--local: admission limit")
    p.add_argument("--server-threads", type=int, default=1, help="--local: torch threads of the server's stub")
    p.add_argument("--local-decoupled", action="store_true", help="--local: serve decoupled (responses from a sender thread)")
    p.set_defaults(func=cmd_fleet)
    return p


def cmd_fleet(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)  # the client only renders frames; leave the cores to the server
    config = FleetConfig(
        url=args.server, model=args.model_name, streams=args.streams, frames=args.frames, chunk=args.chunk,
        height=args.size[0], width=args.size[1], fps=args.fps, source=args.source, scene_frames=args.scene_frames,
        seed=args.seed, first_stream_id=args.first_stream_id, max_restarts=args.max_restarts,
        request_timeout_s=args.timeout, connections=args.connections, inflight=args.inflight, progress=not args.quiet,
        streaming={"auto": None, "yes": True, "no": False}[args.streaming],
        ssl=args.ssl, root_certificates=args.root_certificates, metrics_urls=list(args.metrics_url),
    )
    config.validate()
    server = None
    if args.local:
        workdir = Path(tempfile.mkdtemp(prefix="stac-fleet-"))
        print(f"[fleet] starting a local tritonserver (tiny model, CPU) in {workdir}", file=sys.stderr)
        server = start_local_server(workdir, cache_config={"policy": args.policy, "chunk": args.chunk},
                                    max_streams=max(args.max_streams, args.streams), threads=args.server_threads,
                                    decoupled=args.local_decoupled)
        config.url = server.grpc_url
        config.metrics_urls.append(server.metrics_url)
    try:
        result = run_fleet(config)
    finally:
        if server is not None:
            server.stop()
    print(result.table())
    data = result.to_json()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1))
        print(f"[fleet] wrote {args.out}", file=sys.stderr)
    if args.plot:
        if plot(result, args.plot) is None:
            print("[fleet] --plot skipped: matplotlib is not installed", file=sys.stderr)
    return 0 if result.errors == 0 else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stac_backend.loadgen.fleet")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["fleet", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
