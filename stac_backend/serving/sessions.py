"""Per-stream sessions for a server: lifecycle, ownership, admission control, idle expiry and batched steps.

This is the logic of the Triton model without Triton: requests come in as ``FrameRequest``s (a
correlation id, START/END flags, a chunk of frames and the stream's key) and each gets either outputs
or a ``RequestError`` whose message and code the client sees. The rules:

- A stream exists from a START to its END and is bound to a secret key (``stream_keys``): the one
  its START sent, or else one the server draws and returns in the START's answer. Every later
  request of the stream must send it, and so must a START for a live id (which restarts it). Keys are compared in constant time; a wrong key is answered like an
  unknown stream, so ids cannot be probed.
- A stream silent for ``idle_ttl_s`` (measured from its last answer; never while one of its requests
  is in the batch, and the Triton model expires only while nothing waits in Triton's queue) is freed.
- Admission: at most ``max_streams`` live streams, and the sum of their memory bounds (bounded
  policies) plus what one step adds (the runtime's ``step_memory_bytes``, once) may not exceed
  ``max_cache_bytes``. Where the runtime measured its (micro-batch) step, a stream is charged its
  resting bound (between steps): the step's measurement holds what stepped streams add while
  they run (``engine/admission.py``). A START beyond either is refused at once
  (UNAVAILABLE: retry later), never an out-of-memory crash.
- Bad input is refused per request (INVALID_ARG); other requests of the same batch are unaffected,
  and so is the stream the bad request named. A request its client cancelled before its step leaves
  the stream as it was; one cancelled during its step closes the stream (its frames are in the cache
  and must not be inserted twice by a retry).
- Whenever the model ends a stream on its own (expiry, a refused START, a failed or cancelled step,
  a request for an unknown id), the id is queued in ``to_release`` so that the Triton model can end
  that sequence in Triton too and its slot is free at once.
- Every refusal, expiry and failure is logged once, with the stream id and the cause.
- Requests of different streams in one batch run as one batched forward per chunk shape.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import numpy as np
from torch import Tensor

from ..engine.admission import admission_reserve_bytes, charged_bound
from ..engine.runtime import Runtime, RuntimeStream
from .settings import ServingLimits  # noqa: F401 - part of this module's interface

log = logging.getLogger("stac.serving")

# Error codes, named as pb_utils.TritonError names them (gRPC / HTTP status in docs/serving.md).
INVALID_ARG, UNAVAILABLE, NOT_FOUND, ALREADY_EXISTS, CANCELLED, INTERNAL = (
    "INVALID_ARG", "UNAVAILABLE", "NOT_FOUND", "ALREADY_EXISTS", "CANCELLED", "INTERNAL")


class RequestError(Exception):
    """An error returned to one client request (the server and other streams carry on)."""

    def __init__(self, message: str, code: str = INVALID_ARG):
        super().__init__(message)
        self.code = code


@dataclass
class FrameRequest:
    corr_id: Union[int, str, None]
    start: bool
    end: bool
    frames: Optional[Union[np.ndarray, Tensor]]  # [C, 3, H, W] uint8 (or float in [0, 1])
    key: Optional[bytes] = None  # the stream's key as the client sent it (None: not sent)
    cancelled: Callable[[], bool] = lambda: False  # whether the client gave up on this request


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
    key: bytes = b""
    bound: Optional[int] = None
    step_bytes: int = 0  # what one step adds at this stream's frame size (Runtime.step_memory_bytes)


@dataclass
class StepResult:
    outputs: dict[str, Tensor] = field(default_factory=dict)
    cache_bytes: int = 0
    stream_key: Optional[bytes] = None  # the stream's key (servers with stream keys)


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
        self.to_release: list[Union[int, str]] = []  # ids whose Triton sequence should end (see module doc)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ public
    def handle(self, requests: list[FrameRequest], expire: bool = True) -> list[Union[StepResult, RequestError]]:
        """Serve one batch of requests; returns a result or an error per request, in order.

        expire: free silent streams first (not those with a request in this batch). A server passes
        False while requests may be waiting in its queue (a full batch): their streams are not silent.
        """
        with self._lock:
            if expire:
                self._expire(busy={r.corr_id for r in requests})
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
                        self._refuse(results, i, request, err)
                        continue
                    wave.append((i, session, frames))
                self._run_wave(wave, requests, results)
                pending = later
            return results  # type: ignore[return-value]

    def expire_idle(self) -> int:
        """Free the streams silent for longer than the TTL (for a timer between batches)."""
        with self._lock:
            return self._expire(busy=set())

    def take_releases(self) -> list[Union[int, str]]:
        with self._lock:
            ids, self.to_release = self.to_release, []
            return ids

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
    def _expire(self, busy: set) -> int:
        now = self.clock()
        stale = [cid for cid, s in self.sessions.items()
                 if cid not in busy and now - s.last_used > self.limits.idle_ttl_s]
        for cid in stale:
            log.warning("stream %s expired: no request for %.1f s (idle TTL %g s)",
                        cid, now - self.sessions[cid].last_used, self.limits.idle_ttl_s)
            self._close(cid, release=True)
            self.counters.expired += 1
        return len(stale)

    def _refuse(self, results: list, i: int, request: FrameRequest, err: RequestError) -> None:
        results[i] = err
        self.counters.failed_requests += 1
        log.warning("stream %s: request refused (%s): %s", request.corr_id, err.code, err)

    def _key_matches(self, session: _Session, key: Optional[bytes]) -> bool:
        return not self.limits.stream_keys or (key is not None and hmac.compare_digest(session.key, key))

    def _admit(self, request: FrameRequest) -> tuple[_Session, Tensor]:
        cid = request.corr_id
        if cid is None or cid == 0 or cid == "":
            raise RequestError("request has no sequence (correlation) id: send every frame with a non-zero sequence_id")
        if request.frames is None:
            raise RequestError("request has no FRAMES input")
        session = self.sessions.get(cid)
        if request.start:
            if session is not None:  # repeated START: only its owner may restart a live stream
                if not self._key_matches(session, request.key):
                    raise RequestError(f"stream {cid} is live: a START for it must carry its STREAM_KEY "
                                       "(to start another stream, pick a new random id)", ALREADY_EXISTS)
                self._close(cid)
                self.counters.ended += 1
                session = None
        elif session is None or not self._key_matches(session, request.key):
            if session is None and not request.end:
                self.to_release.append(cid)  # Triton still holds a sequence the model no longer knows
            raise RequestError(
                f"unknown stream {cid} or wrong STREAM_KEY: the first request of a stream must carry "
                "sequence_start=True, the others its key (the stream may also have ended or expired after "
                "being idle)", NOT_FOUND)
        if request.cancelled():
            if session is None and not request.end:
                self.to_release.append(cid)
            raise RequestError("request cancelled by its client before its step; the stream is unchanged", CANCELLED)
        fresh = session is None
        if fresh:
            stream = self.runtime.open_stream()
            # The client's own key (drawn at its START, so it can pipeline before the answer), else one of ours.
            key = request.key if request.key else secrets.token_bytes(16)
            session = _Session(stream, self.clock(), key=key)
        try:
            frames = self._validate(session.stream, request.frames)
            if fresh:
                self._check_admission(session, frames)
        except RequestError:
            if fresh:
                session.stream.reset()
                if not request.end:
                    self.to_release.append(cid)  # a refused START holds no Triton slot
            raise
        if fresh:
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

    def _check_admission(self, session: _Session, frames: Tensor) -> None:
        if len(self.sessions) >= self.limits.max_streams:
            self.counters.rejected_starts += 1
            raise RequestError(f"server is at its limit of {self.limits.max_streams} streams; retry later", UNAVAILABLE)
        bound = session.stream.memory_bound(tuple(frames.shape[-2:]))
        session.bound = bound
        if self.limits.max_cache_bytes is not None:
            if bound is None:
                self.counters.rejected_starts += 1
                raise RequestError("this server's cache policy has no memory bound, and the server caps cache memory",
                                   UNAVAILABLE)
            # A step's activations are reserved once (steps run one at a time), at the largest frame size's need.
            hw = tuple(frames.shape[-2:])
            measured = self.runtime.step_memory_bytes(hw)
            session.step_bytes = measured or 0
            resting = session.stream.resting_memory_bound(hw) if hasattr(session.stream, "resting_memory_bound") else None
            outputs = self.runtime.step_output_bytes(hw) if measured is not None else None
            bound = session.bound = charged_bound(bound, resting, measured, outputs)
            step = max([s.step_bytes for s in self.sessions.values()] + [session.step_bytes])
            reserved = admission_reserve_bytes([s.bound or 0 for s in self.sessions.values()], step)
            if reserved + bound > self.limits.max_cache_bytes:
                self.counters.rejected_starts += 1
                raise RequestError(
                    f"not enough cache memory for another stream: {reserved} of {self.limits.max_cache_bytes} bytes "
                    f"reserved ({step} of them for one step's activations), a stream needs up to {bound}; retry later",
                    UNAVAILABLE
                )

    def _run_wave(self, wave, requests, results) -> None:
        # A request cancelled while it waited for this wave is answered without a step.
        for item in [item for item in wave if requests[item[0]].cancelled()]:
            wave.remove(item)
            i, session, _ = item
            if session.stream.frames_seen == 0:  # a START that never ran: nothing to keep
                self._close(requests[i].corr_id, release=True)
            self._refuse(results, i, requests[i], RequestError(
                "request cancelled by its client before its step; the stream is unchanged", CANCELLED))
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
                    outs.append(RequestError(f"step failed: {session.stream.broken}", INTERNAL))
                    continue
                try:
                    outs.append(push([session.stream], [frames])[0])
                except Exception as exc:  # noqa: BLE001 - reported to that client only
                    outs.append(RequestError(f"step failed: {type(exc).__name__}: {exc}", INTERNAL))
        now = self.clock()
        for (i, session, frames), out in zip(wave, outs):
            request = requests[i]
            cid = request.corr_id
            if not isinstance(out, RequestError) and request.cancelled():
                out = RequestError("request cancelled by its client during its step: the stream is closed "
                                   "(its frames are in the cache); start a new stream", CANCELLED)
            if isinstance(out, RequestError):
                self._refuse(results, i, request, out)
                self._close(cid, release=not request.end)  # its caches may be half-updated
                continue
            session.last_used = now  # silence is measured from the answer
            self.counters.frames += frames.shape[0]
            results[i] = StepResult(outputs=out, cache_bytes=session.stream.memory_bytes(),
                                    stream_key=session.key if self.limits.stream_keys else None)
            if request.end:
                self._close(cid)
                self.counters.ended += 1

    def _close(self, cid, release: bool = False) -> None:
        session = self.sessions.pop(cid, None)
        if session is not None:
            self.counters.evicted_tokens_ended += session.stream.evicted_tokens()
            session.stream.reset()
        if release:
            self.to_release.append(cid)
