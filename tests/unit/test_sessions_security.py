"""StreamSessions' ownership, expiry, release and error-code rules on a fake runtime and a fake clock."""

from __future__ import annotations

import numpy as np
import torch

from stac_backend.engine.runtime import Runtime, RuntimeStream
from stac_backend.serving.sessions import (
    ALREADY_EXISTS, CANCELLED, INVALID_ARG, NOT_FOUND, UNAVAILABLE, FrameRequest, RequestError, ServingLimits,
    StepResult, StreamSessions,
)


class FakeStream(RuntimeStream):
    def __init__(self):
        self.frames_seen = 0

    def validate(self, frames):
        frames = torch.as_tensor(np.asarray(frames))
        if frames.ndim != 4 or frames.shape[0] == 0:
            raise ValueError("a chunk needs at least one frame")
        return frames

    def memory_bytes(self):
        return self.frames_seen

    def memory_bound(self, image_hw=None):
        return 10

    def reset(self):
        self.frames_seen = 0


class FakeRuntime(Runtime):
    name = "fake"

    def open_stream(self):
        return FakeStream()

    def step(self, streams, images):
        outs = []
        for stream, chunk in zip(streams, images):
            index = torch.arange(stream.frames_seen, stream.frames_seen + chunk.shape[0])
            stream.frames_seen += chunk.shape[0]
            outs.append({"frame_index": index})
        return outs


class Clock:
    now = 100.0

    def __call__(self):
        return self.now


KEY, OTHER = b"k" * 16, b"x" * 16


def chunk(n=2):
    return np.zeros((n, 3, 14, 14), np.uint8)


def make(**limits):
    clock = Clock()
    limits = {"max_streams": 2, "idle_ttl_s": 10.0, "stream_keys": True, **limits}
    return StreamSessions(FakeRuntime(), ServingLimits(**limits), clock=clock), clock


def one(sessions, **request):
    request = {"corr_id": 7, "start": False, "end": False, "frames": chunk(), **request}
    return sessions.handle([FrameRequest(**request)])[0]


def index(result):
    assert isinstance(result, StepResult), result
    return result.outputs["frame_index"].tolist()


def code(result):
    assert isinstance(result, RequestError), result
    return result.code


def test_a_stream_needs_its_key_and_a_wrong_key_changes_nothing():
    sessions, _ = make()
    assert index(one(sessions, start=True, key=KEY)) == [0, 1]
    assert code(one(sessions)) == NOT_FOUND
    assert code(one(sessions, key=OTHER)) == NOT_FOUND
    assert code(one(sessions, start=True, key=OTHER)) == ALREADY_EXISTS
    assert sessions.to_release == []  # the owner's Triton sequence is left alone
    assert index(one(sessions, key=KEY)) == [2, 3]
    assert index(one(sessions, start=True, key=KEY)) == [0, 1]  # the owner may restart it


def test_the_server_draws_a_key_when_the_start_brings_none():
    sessions, _ = make()
    result = one(sessions, start=True)
    assert isinstance(result, StepResult) and len(result.stream_key) == 16
    assert index(one(sessions, key=result.stream_key)) == [2, 3]


def test_refused_starts_are_released_and_counted_by_cause():
    sessions, _ = make(max_streams=1)
    assert code(one(sessions, corr_id=1, start=True, frames=chunk(0), key=KEY)) == INVALID_ARG
    one(sessions, corr_id=2, start=True, key=KEY)
    assert code(one(sessions, corr_id=3, start=True, key=KEY)) == UNAVAILABLE
    assert code(one(sessions, corr_id=4, key=KEY)) == NOT_FOUND
    assert sessions.take_releases() == [1, 3, 4] and sessions.take_releases() == []
    assert sessions.stats()["active_streams"] == 1


def test_silence_counts_from_the_answer_and_never_while_a_request_is_in_hand():
    sessions, clock = make()
    one(sessions, start=True, key=KEY)
    clock.now += 15  # its next request waited in a queue past the TTL: it is in this batch, so kept
    assert index(one(sessions, key=KEY)) == [2, 3]
    clock.now += 9
    assert sessions.expire_idle() == 0
    clock.now += 2
    assert sessions.expire_idle() == 1 and sessions.take_releases() == [7]
    assert code(one(sessions, key=KEY)) == NOT_FOUND


def test_a_full_batch_expires_nothing():
    sessions, clock = make()
    one(sessions, corr_id=1, start=True, key=KEY)
    clock.now += 20
    sessions.handle([FrameRequest(2, True, False, chunk(), KEY)], expire=False)
    assert 1 in sessions.sessions
    sessions.handle([FrameRequest(2, False, False, chunk(), KEY)])
    assert 1 not in sessions.sessions


def test_a_cancelled_request_leaves_the_stream_as_it_was():
    sessions, _ = make()
    one(sessions, start=True, key=KEY)
    assert code(one(sessions, key=KEY, cancelled=lambda: True)) == CANCELLED
    assert index(one(sessions, key=KEY)) == [2, 3]  # the retry is inserted once


def test_a_request_cancelled_during_its_step_closes_the_stream():
    sessions, _ = make()
    one(sessions, start=True, key=KEY)
    calls = iter([False, False, True])  # admitted, then cancelled by the time its step has run
    assert code(one(sessions, key=KEY, cancelled=lambda: next(calls))) == CANCELLED
    assert 7 not in sessions.sessions and sessions.take_releases() == [7]
