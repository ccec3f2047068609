"""Per-stream sessions for a server: lifecycle, admission control, idle expiry and batched steps.

This is the logic of the Triton model without Triton: requests come in as ``FrameRequest``s (a
correlation id, START/END flags and a chunk of frames) and each gets either outputs or a
``RequestError`` whose message the client sees. The rules:

- A stream exists from a START to its END. A START for a live id resets that stream (Triton
  treats a repeated START as the start of a new sequence). A request without START for an unknown
  id is refused - it never started, it ended, or it expired.
- Streams idle longer than ``idle_ttl_s`` are freed (Triton drops idle sequences silently, so the
  model must expire its own state; the TTL is set no shorter than Triton's idle timeout).
- Admission: at most ``max_streams`` live streams, and the sum of their memory bounds (bounded
  policies) plus what one step adds (the runtime's ``step_memory_bytes``, once) may not exceed
  ``max_cache_bytes``. A START beyond either is refused with a clear
  error, never an out-of-memory crash.
- Bad input (dtype, rank, sizes, frame count, oversized frames) is refused per request; other
  requests of the same batch are unaffected, and so is the stream the bad request named.
- Requests of different streams in one batch run as one batched forward per chunk shape.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import numpy as np
from torch import Tensor

from ..engine.runtime import Runtime, RuntimeStream


class RequestError(Exception):
    """An error returned to one client request (the server and other streams carry on)."""


@dataclass
class FrameRequest:
    corr_id: Union[int, str, None]
    start: bool
    end: bool
    frames: Optional[Union[np.ndarray, Tensor]]  # [C, 3, H, W] uint8 (or float in [0, 1])


@dataclass
class ServingLimits:
    max_streams: int = 16
    max_cache_bytes: Optional[int] = None  # sum of per-stream memory bounds
    idle_ttl_s: float = 120.0
    max_image_pixels: int = 518 * 518  # per frame; larger requests are refused as oversized


@dataclass
class SessionCounters:
    started: int = 0
    ended: int = 0
    expired: int = 0
    rejected_starts: int = 0
    failed_requests: int = 0
    frames: int = 0
    evicted_tokens_ended: int = 0  # evicted tokens of streams already freed (so the total never drops)


@dataclass
class _Session:
    stream: RuntimeStream
    last_used: float
    bound: Optional[int] = None
    step_bytes: int = 0  # what one step adds at this stream's frame size (Runtime.step_memory_bytes)


@dataclass
class StepResult:
    outputs: dict[str, Tensor] = field(default_factory=dict)
    cache_bytes: int = 0


class StreamSessions:
    """The streams of one model instance on one runtime (``engine.runtime``), under ``limits``.
    ``clock`` (seconds, monotonic) is injectable so that expiry can be tested without sleeping."""

    def __init__(
        self,
        runtime: Runtime,
        limits: ServingLimits = ServingLimits(),
        clock: Callable[[], float] = time.monotonic,
    ):
        self.runtime = runtime
        self.limits = limits
        self.clock = clock
        self.sessions: dict[Union[int, str], _Session] = {}
        self.counters = SessionCounters()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ public
    def handle(self, requests: list[FrameRequest]) -> list[Union[StepResult, RequestError]]:
        """Serve one batch of requests; returns a result or an error per request, in order."""
        with self._lock:
            self.expire_idle()
            results: list[Union[StepResult, RequestError, None]] = [None] * len(requests)
            # Steps run in waves: requests of different streams share a step, and a stream's next
            # request is admitted only after its earlier one ran (so a repeated START or a request
            # after END in the same batch sees the stream as that earlier request left it).
            pending = list(enumerate(requests))
            while pending:
                wave, later, busy = [], [], set()
                for i, request in pending:
                    if request.corr_id in busy:
                        later.append((i, request))
                        continue
                    busy.add(request.corr_id)
                    try:
                        session, frames = self._admit(request)
                    except RequestError as err:
                        results[i] = err
                        self.counters.failed_requests += 1
                        continue
                    wave.append((i, session, frames))
                self._run_wave(wave, requests, results)
                pending = later
            return results  # type: ignore[return-value]

    def expire_idle(self) -> int:
        now = self.clock()
        stale = [cid for cid, s in self.sessions.items() if now - s.last_used > self.limits.idle_ttl_s]
        for cid in stale:
            self._close(cid)
            self.counters.expired += 1
        return len(stale)

    def stats(self) -> dict[str, int]:
        with self._lock:
            cache = sum(s.stream.memory_bytes() for s in self.sessions.values())
            evicted = sum(s.stream.evicted_tokens() for s in self.sessions.values())
            c = self.counters
            return {
                "active_streams": len(self.sessions),
                "cache_bytes": cache,
                "reserved_cache_bytes": sum(s.bound or 0 for s in self.sessions.values()),
                "evicted_tokens_live_streams": evicted,
                "evicted_tokens": c.evicted_tokens_ended + evicted,
                "streams_started": c.started,
                "streams_ended": c.ended,
                "streams_expired": c.expired,
                "rejected_starts": c.rejected_starts,
                "failed_requests": c.failed_requests,
                "frames": c.frames,
            }

    def close_all(self) -> None:
        with self._lock:
            for cid in list(self.sessions):
                self._close(cid)

    # ------------------------------------------------------------------ internals
    def _admit(self, request: FrameRequest) -> tuple[_Session, Tensor]:
        cid = request.corr_id
        if cid is None or cid == 0 or cid == "":
            raise RequestError("request has no sequence (correlation) id: send every frame with a non-zero sequence_id")
        if request.frames is None:
            raise RequestError("request has no FRAMES input")
        session = self.sessions.get(cid)
        if request.start:
            if session is not None:  # repeated START: the old sequence ends here
                self._close(cid)
                self.counters.ended += 1
                session = None
        elif session is None:
            raise RequestError(
                f"unknown stream {cid}: the first request of a stream must carry sequence_start=True "
                "(the stream may also have ended or expired after being idle)"
            )
        fresh = session is None
        if fresh:
            stream = self.runtime.open_stream()
            session = _Session(stream, self.clock())
        frames = self._validate(session.stream, request.frames)
        if fresh:
            self._check_admission(cid, session, frames)
            self.sessions[cid] = session
            self.counters.started += 1
        session.last_used = self.clock()
        return session, frames

    def _validate(self, stream: RuntimeStream, frames: Union[np.ndarray, Tensor]) -> Tensor:
        if not isinstance(frames, (np.ndarray, Tensor)):
            raise RequestError("FRAMES must be an array")
        if frames.ndim == 4 and frames.shape[2] * frames.shape[3] > self.limits.max_image_pixels:
            raise RequestError(
                f"oversized frames: {frames.shape[2]}x{frames.shape[3]} exceeds {self.limits.max_image_pixels} pixels per frame"
            )
        try:
            return stream.validate(frames)
        except (ValueError, RuntimeError) as exc:
            raise RequestError(f"bad FRAMES: {exc}") from None

    def _check_admission(self, cid, session: _Session, frames: Tensor) -> None:
        if len(self.sessions) >= self.limits.max_streams:
            self.counters.rejected_starts += 1
            raise RequestError(f"server is at its limit of {self.limits.max_streams} streams; retry later")
        bound = session.stream.memory_bound(tuple(frames.shape[-2:]))
        session.bound = bound
        if self.limits.max_cache_bytes is not None:
            if bound is None:
                self.counters.rejected_starts += 1
                raise RequestError("this server's cache policy has no memory bound, and the server caps cache memory")
            # A step's activations are reserved once (steps run one at a time), at the largest frame size's need.
            session.step_bytes = self.runtime.step_memory_bytes(tuple(frames.shape[-2:])) or 0
            step = max([s.step_bytes for s in self.sessions.values()] + [session.step_bytes])
            reserved = sum(s.bound or 0 for s in self.sessions.values()) + step
            if reserved + bound > self.limits.max_cache_bytes:
                self.counters.rejected_starts += 1
                raise RequestError(
                    f"not enough cache memory for another stream: {reserved} of {self.limits.max_cache_bytes} bytes "
                    f"reserved ({step} of them for one step's activations), a stream needs up to {bound}; retry later"
                )

    def _run_wave(self, wave, requests, results) -> None:
        if not wave:
            return
        sessions = [s for _, s, _ in wave]
        push = self.runtime.step
        try:
            outs = push([s.stream for s in sessions], [f for _, _, f in wave])
        except Exception:
            # Isolate the failure: run the wave's streams one by one so only the culprit fails. A
            # stream the failed step left broken (caches half-updated) is not stepped again.
            outs = []
            for session, (_, _, frames) in zip(sessions, wave):
                if session.stream.broken is not None:
                    outs.append(RequestError(f"step failed: {session.stream.broken}"))
                    continue
                try:
                    outs.append(push([session.stream], [frames])[0])
                except Exception as exc:  # noqa: BLE001 - reported to that client only
                    outs.append(RequestError(f"step failed: {type(exc).__name__}: {exc}"))
        for (i, session, frames), out in zip(wave, outs):
            cid = requests[i].corr_id
            if isinstance(out, RequestError):
                results[i] = out
                self.counters.failed_requests += 1
                self._close(cid)  # its caches may be half-updated
                continue
            self.counters.frames += frames.shape[0]
            results[i] = StepResult(outputs=out, cache_bytes=session.stream.memory_bytes())
            if requests[i].end:
                self._close(cid)
                self.counters.ended += 1

    def _close(self, cid) -> None:
        session = self.sessions.pop(cid, None)
        if session is not None:
            self.counters.evicted_tokens_ended += session.stream.evicted_tokens()
            session.stream.reset()

