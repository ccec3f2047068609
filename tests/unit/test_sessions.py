"""StreamSessions, the serving layer under the Triton model: lifecycle, idle expiry, admission and
batching rules, on a fake clock and a fake runtime (no model), plus one check on the torch runtime
that what sessions report never stalls the GPU."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pytest
import torch
from torch import Tensor

from stac_backend.cache import CacheConfig
from stac_backend.engine.runtime import Runtime, RuntimeStream
from stac_backend.engine.torch_runtime import TorchRuntime
from stac_backend.serving.sessions import FrameRequest, RequestError, ServingLimits, StepResult, StreamSessions

BYTES_PER_FRAME = 100
POISON = 13  # a chunk whose first pixel holds this value makes the fake runtime's step fail


class FakeStream(RuntimeStream):
    """Holds BYTES_PER_FRAME per frame seen, up to ``bound``; checks frames like the real streams."""

    def __init__(self, bound: Optional[int]):
        self.bound = bound
        self.frames_seen = 0
        self.broken = None
        self.resets = 0

    def validate(self, frames) -> Tensor:
        if self.broken is not None:
            raise RuntimeError(f"stream is unusable ({self.broken})")
        if frames.ndim != 4 or frames.shape[0] > 4:
            raise ValueError(f"a chunk holds at most 4 frames [C, 3, H, W], got {tuple(frames.shape)}")
        return torch.as_tensor(np.asarray(frames))

    def memory_bytes(self) -> int:
        return self.frames_seen * BYTES_PER_FRAME

    def memory_bound(self, image_hw=None) -> Optional[int]:
        return self.bound

    def evicted_tokens(self) -> int:
        return 2 * self.frames_seen

    def reset(self) -> None:
        self.frames_seen = 0
        self.broken = None
        self.resets += 1


class FakeRuntime(Runtime):
    """Steps record what ran together; outputs say which frames of which stream they belong to.

    A poisoned chunk fails the step. ``break_streams`` says what the failure did: like the torch
    engine after a failure in the middle of a step (every stream of the step broken), or like a
    refusal before any work (streams untouched).
    """

    name = "fake"

    def __init__(self, bound: Optional[int] = 1000, break_streams: bool = False):
        self.bound = bound
        self.break_streams = break_streams
        self.opened: list[FakeStream] = []
        self.steps: list[list[int]] = []  # per step: index (in ``opened``) of each stream

    def open_stream(self) -> FakeStream:
        self.opened.append(FakeStream(self.bound))
        return self.opened[-1]

    def step(self, streams: Sequence[FakeStream], images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        self.steps.append([self.opened.index(s) for s in streams])
        if any(int(x.reshape(-1)[0]) == POISON for x in images):
            if self.break_streams:
                for s in streams:
                    s.broken = "RuntimeError: poisoned chunk"
            raise RuntimeError("poisoned chunk")
        outs = []
        for s, x in zip(streams, images):
            outs.append({"frame_index": torch.arange(s.frames_seen, s.frames_seen + x.shape[0]),
                         "marker": x[:, 0, 0, 0].clone()})
            s.frames_seen += x.shape[0]
        return outs


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def chunk(marker: int = 0, frames: int = 4) -> np.ndarray:
    out = np.zeros((frames, 3, 2, 2), np.uint8)
    out[:, 0, 0, 0] = marker
    return out


def request(cid, start=False, end=False, frames=None) -> FrameRequest:
    return FrameRequest(corr_id=cid, start=start, end=end, frames=chunk() if frames is None else frames)


def sessions_with(runtime=None, clock=None, **limits) -> StreamSessions:
    return StreamSessions(runtime or FakeRuntime(), ServingLimits(**limits), clock=clock or FakeClock())


def one(sessions: StreamSessions, req: FrameRequest):
    [result] = sessions.handle([req])
    return result


def test_idle_stream_expires_after_the_ttl_and_is_gone():
    clock = FakeClock()
    runtime = FakeRuntime()
    sessions = sessions_with(runtime, clock, idle_ttl_s=60.0)
    assert isinstance(one(sessions, request(1, start=True)), StepResult)
    clock.now += 50
    assert isinstance(one(sessions, request(1)), StepResult)  # a request keeps the stream alive
    clock.now += 60  # exactly the TTL since its last request: still alive
    assert sessions.expire_idle() == 0 and 1 in sessions.sessions
    clock.now += 0.5
    assert isinstance(one(sessions, request(2, start=True)), StepResult)  # any request runs the expiry
    stats = sessions.stats()
    assert stats["streams_expired"] == 1 and stats["active_streams"] == 1
    assert runtime.opened[0].resets == 1  # its memory was freed
    result = one(sessions, request(1))
    assert isinstance(result, RequestError) and "unknown stream 1" in str(result) and "expired" in str(result)


def test_repeated_start_resets_the_stream():
    runtime = FakeRuntime()
    sessions = sessions_with(runtime)
    one(sessions, request(5, start=True))
    second = one(sessions, request(5))
    assert second.outputs["frame_index"].tolist() == [4, 5, 6, 7]
    again = one(sessions, request(5, start=True))
    assert again.outputs["frame_index"].tolist() == [0, 1, 2, 3]  # a new sequence from frame 0
    assert runtime.opened[0].resets == 1 and len(runtime.opened) == 2
    stats = sessions.stats()
    assert stats["streams_started"] == 2 and stats["streams_ended"] == 1 and stats["active_streams"] == 1


def test_cache_bytes_admission_is_refused_then_recovers_when_a_stream_ends():
    sessions = sessions_with(FakeRuntime(bound=1000), max_cache_bytes=2500)
    assert isinstance(one(sessions, request(1, start=True)), StepResult)
    assert isinstance(one(sessions, request(2, start=True)), StepResult)
    refused = one(sessions, request(3, start=True))
    assert isinstance(refused, RequestError)
    assert "not enough cache memory" in str(refused) and "2000 of 2500" in str(refused) and "1000" in str(refused)
    stats = sessions.stats()
    assert stats["rejected_starts"] == 1 and stats["active_streams"] == 2 and stats["reserved_cache_bytes"] == 2000
    assert isinstance(one(sessions, request(3)), RequestError)  # it was never admitted
    one(sessions, request(1, end=True))
    assert isinstance(one(sessions, request(3, start=True)), StepResult)  # room again
    assert sessions.stats()["reserved_cache_bytes"] == 2000


class MeasuredStepRuntime(FakeRuntime):
    """Streams whose resting bound is 600 of their 1000, and a measured micro-batch step of 500."""

    def open_stream(self) -> FakeStream:
        stream = super().open_stream()
        stream.resting_memory_bound = lambda image_hw=None: 600
        return stream

    def step_memory_bytes(self, image_hw):
        return 500


def test_a_measured_step_charges_each_stream_its_resting_bound_and_the_step_once():
    sessions = sessions_with(MeasuredStepRuntime(bound=1000), max_cache_bytes=2300)
    assert isinstance(one(sessions, request(1, start=True)), StepResult)
    assert isinstance(one(sessions, request(2, start=True)), StepResult)
    assert isinstance(one(sessions, request(3, start=True)), StepResult)  # 3 x 600 + 500 = 2300
    refused = one(sessions, request(4, start=True))
    assert isinstance(refused, RequestError) and "2300 of 2300" in str(refused) and "500 of them" in str(refused)
    assert sessions.stats()["reserved_cache_bytes"] == 1800


def test_unbounded_cache_is_refused_when_cache_bytes_are_capped():
    sessions = sessions_with(FakeRuntime(bound=None), max_cache_bytes=10_000)
    result = one(sessions, request(1, start=True))
    assert isinstance(result, RequestError) and "no memory bound" in str(result)
    assert sessions_with(FakeRuntime(bound=None)).handle([request(1, start=True)])[0].outputs  # no cap: admitted


def test_stream_count_limit():
    sessions = sessions_with(max_streams=2)
    results = sessions.handle([request(i, start=True) for i in (1, 2, 3)])
    assert [type(r) for r in results] == [StepResult, StepResult, RequestError]
    assert "limit of 2 streams" in str(results[2])


def test_two_requests_of_one_stream_in_one_batch_run_in_order():
    runtime = FakeRuntime()
    sessions = sessions_with(runtime)
    results = sessions.handle([
        request(1, start=True, frames=chunk(1)),
        request(1, frames=chunk(2, frames=2)),
        request(2, start=True, frames=chunk(3)),
        request(1, end=True, frames=chunk(4)),
        request(1, frames=chunk(5)),  # after its END in the same batch: the stream is gone
    ])
    assert [r.outputs["frame_index"].tolist() for r in results[:4]] == [[0, 1, 2, 3], [4, 5], [0, 1, 2, 3], [6, 7, 8, 9]]
    assert [int(r.outputs["marker"][0]) for r in results[:4]] == [1, 2, 3, 4]
    assert isinstance(results[4], RequestError) and "unknown stream 1" in str(results[4])
    assert runtime.steps == [[0, 1], [0], [0]]  # different streams share a step; one stream's requests follow each other


def test_repeated_start_in_one_batch_restarts_after_the_first_ran():
    runtime = FakeRuntime()
    sessions = sessions_with(runtime)
    results = sessions.handle([request(1, start=True, frames=chunk(1)), request(1, frames=chunk(2)),
                               request(1, start=True, frames=chunk(3))])
    assert [r.outputs["frame_index"].tolist() for r in results] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
    assert runtime.opened[0].resets == 1 and runtime.steps == [[0], [0], [1]]
    assert sessions.stats()["streams_started"] == 2 and sessions.stats()["streams_ended"] == 1


def test_bad_input_fails_its_request_only():
    sessions = sessions_with()
    one(sessions, request(1, start=True))
    results = sessions.handle([request(1, frames=chunk(frames=5)), request(2, start=True)])
    assert isinstance(results[0], RequestError) and "bad FRAMES" in str(results[0])
    assert isinstance(results[1], StepResult)
    assert one(sessions, request(1)).outputs["frame_index"].tolist() == [4, 5, 6, 7]  # the stream is untouched


def test_failing_step_is_isolated_to_its_stream():
    """A failure before any work (streams untouched): the others of the batch are stepped alone and
    succeed; only the culprit's request fails and its stream is closed."""
    runtime = FakeRuntime(break_streams=False)
    sessions = sessions_with(runtime)
    sessions.handle([request(1, start=True), request(2, start=True)])
    results = sessions.handle([request(1), request(2, frames=chunk(POISON))])
    assert results[0].outputs["frame_index"].tolist() == [4, 5, 6, 7]
    assert isinstance(results[1], RequestError) and "step failed" in str(results[1]) and "poisoned" in str(results[1])
    assert runtime.steps[-3:] == [[0, 1], [0], [1]]
    assert 2 not in sessions.sessions and sessions.stats()["failed_requests"] == 1
    assert one(sessions, request(1)).outputs["frame_index"].tolist() == [8, 9, 10, 11]


def test_streams_a_failed_step_broke_are_not_stepped_again():
    """A failure in the middle of a step (the torch engine marks every stream of it broken): no
    stream of it is run again on half-updated caches; each request fails and its stream closes."""
    runtime = FakeRuntime(break_streams=True)
    sessions = sessions_with(runtime)
    sessions.handle([request(1, start=True), request(2, start=True), request(3, start=True)])
    results = sessions.handle([request(1), request(2, frames=chunk(POISON))])
    assert all(isinstance(r, RequestError) and "poisoned" in str(r) for r in results)
    assert runtime.steps[-1] == [0, 1]  # nothing re-ran
    assert sorted(sessions.sessions) == [3]
    assert isinstance(one(sessions, request(3)), StepResult)


def test_requests_without_an_id_or_frames_are_refused():
    sessions = sessions_with()
    results = sessions.handle([request(0, start=True), FrameRequest(7, True, False, None)])
    assert "correlation" in str(results[0]) and "no FRAMES" in str(results[1])


def test_stats_read_host_counters_only(tiny_model, frames12):
    """The Triton model publishes stats() after every execute; the stac cache's own stats() reads the
    voxel pool's counters from the device (a synchronisation per execute), so the evicted-token
    count must come from the cache's host-side counter."""
    cache = CacheConfig(policy="stac", retrieval_start_frame=8, voxel_size=0.01, conf_threshold=0.0)
    sessions = StreamSessions(TorchRuntime(tiny_model, cache), ServingLimits(max_streams=2))
    for i in range(0, 12, 4):
        [result] = sessions.handle([FrameRequest(corr_id=5, start=i == 0, end=False, frames=frames12[i:i + 4])])
        assert isinstance(result, StepResult)
    stream_cache = sessions.sessions[5].stream.cache
    assert stream_cache.evicted_tokens > 0  # the case reaches evictions

    def read_the_device():
        raise AssertionError("stats() read the cache's device-side statistics")

    stream_cache.stats = read_the_device
    stats = sessions.stats()
    assert stats["evicted_tokens_live_streams"] == stream_cache.evicted_tokens
    assert stats["frames"] == 12 and stats["active_streams"] == 1


@pytest.mark.parametrize("ended", [True, False])
def test_closing_frees_every_stream(ended):
    runtime = FakeRuntime()
    sessions = sessions_with(runtime)
    sessions.handle([request(1, start=True, end=ended), request(2, start=True)])
    sessions.close_all()
    assert sessions.stats()["active_streams"] == 0 and sessions.stats()["cache_bytes"] == 0
    assert all(s.resets == 1 for s in runtime.opened)
