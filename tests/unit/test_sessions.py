"""StreamSessions, the serving layer under the Triton model: what it reports must not stall the GPU."""

from __future__ import annotations

from stac_backend.cache import CacheConfig
from stac_backend.engine.torch_runtime import TorchRuntime
from stac_backend.serving.sessions import FrameRequest, ServingLimits, StepResult, StreamSessions


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
