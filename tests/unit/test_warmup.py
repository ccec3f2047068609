"""Warm-up at server start: throwaway streams run every part of a step once - the voxel pool's
insert (with merges) and retrieval included, even under a configuration that would pool nothing
for a while - measure what a step adds, and leave nothing behind."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch

import stac_backend.engine.torch_runtime as torch_runtime
from stac_backend.cache import CacheConfig
from stac_backend.cache.stac import StacCache
from stac_backend.cache.voxel_pool import VoxelPool
from stac_backend.engine.torch_runtime import TorchRuntime, warmup_steps
from stac_backend.serving.repository import ServeSettings, render_config
from stac_backend.serving.triton_model import TritonPythonModel, warmup_sizes

HW = (28, 42)


@pytest.fixture
def spies(monkeypatch):
    """Counts of the pool's insert and retrieval, of steps attending retrieved tokens, the pool
    statistics of every stac stream when it is freed, and weak references to every stream made."""
    seen = {"insert": 0, "retrieve": 0, "attended_retrieved": 0, "pool_stats": [], "streams": []}
    insert, retrieve, extra_keys, reset = VoxelPool.insert, VoxelPool.retrieve_layers, StacCache.extra_keys, StacCache.reset

    def counting_insert(self, *args, **kwargs):
        seen["insert"] += 1
        return insert(self, *args, **kwargs)

    def counting_retrieve(self, *args, **kwargs):
        seen["retrieve"] += 1
        return retrieve(self, *args, **kwargs)

    def counting_extra_keys(self, layer):
        found = extra_keys(self, layer)
        seen["attended_retrieved"] += found is not None
        return found

    def recording_reset(self):
        if self.pool is not None:
            seen["pool_stats"].append(self.pool.stats())
        reset(self)

    class RecordedStream(torch_runtime.Stream):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["streams"].append(weakref.ref(self))

    monkeypatch.setattr(VoxelPool, "insert", counting_insert)
    monkeypatch.setattr(VoxelPool, "retrieve_layers", counting_retrieve)
    monkeypatch.setattr(StacCache, "extra_keys", counting_extra_keys)
    monkeypatch.setattr(StacCache, "reset", recording_reset)
    monkeypatch.setattr(torch_runtime, "Stream", RecordedStream)
    return seen


def test_warmup_runs_the_pools_insert_merge_and_retrieval_and_leaves_nothing(tiny_model, spies):
    # The default stac configuration: a confidence bar of 2 and retrieval from frame 16 would keep
    # the pool empty through a short warm-up; the warm-up's own copy of it fills the pool at once.
    config = CacheConfig(policy="stac")
    runtime = TorchRuntime(tiny_model, config, max_batch_streams=2)
    rng = torch.get_rng_state()
    report = runtime.warmup(HW, batch_sizes=(1, 5))

    steps = warmup_steps(runtime.warmup_cache_config())
    assert report["steps"] == steps and report["streams_per_step"] == [1, 2]  # 5 clipped to the micro-batch
    assert report["micro_batch_streams"] == 2
    json.dumps(report)  # loggable as it is
    assert spies["insert"] >= 3 and spies["retrieve"] >= 3  # every throwaway run filed and retrieved
    assert spies["attended_retrieved"] > 0  # and a later step attended what was retrieved
    assert len(spies["pool_stats"]) == 4  # one stream, one coarse-voxel stream, two streams together
    assert all(s["inserted_tokens"] > 0 for s in spies["pool_stats"])
    assert any(s["merged_tokens"] > 0 for s in spies["pool_stats"])
    assert any(s["pivots_created"] > 0 for s in spies["pool_stats"])

    # Nothing left behind: every throwaway stream is gone, the runtime's own config is untouched,
    # the global RNG did not move.
    gc.collect()
    assert spies["streams"] and all(ref() is None for ref in spies["streams"])
    assert runtime.cache_config == config and runtime.open_stream().cache.config == config
    assert torch.equal(torch.get_rng_state(), rng)

    # What a step adds was measured (CPU: the profiler's allocation events) and is reported.
    one, two = runtime.activation_bytes(HW, 1), runtime.activation_bytes(HW, 2)
    assert 0 < one < two
    assert runtime.step_memory_bytes(HW) == two
    assert report["step_peak_bytes"] == {"1": one, "2": two}
    assert runtime.activation_bytes(HW, 4) >= two  # extrapolated beyond the measurements


def test_warmup_of_a_policy_without_a_pool(tiny_model, spies):
    runtime = TorchRuntime(tiny_model, CacheConfig(policy="window", window=4), max_batch_streams=None)
    report = runtime.warmup(HW)
    assert report["streams_per_step"] == [1] and report["micro_batch_streams"] is None
    assert spies["insert"] == spies["retrieve"] == 0
    gc.collect()
    assert spies["streams"] and all(ref() is None for ref in spies["streams"])
    assert runtime.step_memory_bytes(HW) is None  # no split: nothing constant to reserve


def test_warmup_refuses_a_frame_size_the_model_cannot_take(tiny_model, spies):
    runtime = TorchRuntime(tiny_model, CacheConfig(policy="stac"), max_batch_streams=2)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        runtime.warmup((30, 42))
    gc.collect()
    assert all(ref() is None for ref in spies["streams"])


def _config(**parameters):
    return {"parameters": {k: {"string_value": v} for k, v in parameters.items()}}


def test_warmup_parameter():
    assert warmup_sizes(_config(), "GPU") == [(392, 518)]
    assert warmup_sizes(_config(), "CPU") == []
    assert warmup_sizes(_config(WARMUP="off"), "GPU") == []
    assert warmup_sizes(_config(WARMUP="on"), "CPU") == [(392, 518)]
    assert warmup_sizes(_config(WARMUP="28x42, 56x84"), "CPU") == [(28, 42), (56, 84)]
    for bad in ("28", "28x", "x42", "28x42x3", "0x42", "maybe"):
        with pytest.raises(ValueError, match="WARMUP must be"):
            warmup_sizes(_config(WARMUP=bad), "GPU")
    # Rendered only when set, so the default config renders exactly as before.
    assert "WARMUP" not in render_config(ServeSettings())
    assert 'key: "WARMUP" value: { string_value: "28x42" }' in render_config(ServeSettings(warmup="28x42"))


def test_triton_model_warms_up_in_initialize(monkeypatch):
    calls = []
    monkeypatch.setattr(TorchRuntime, "warmup", lambda self, image_hw, batch_sizes=None: calls.append((image_hw, batch_sizes)))
    config = {"name": "stac", "max_batch_size": 4, **_config(PRESET="tiny", DEVICE="cpu", WARMUP="28x42")}
    model = TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_instance_kind": "CPU"})
    try:
        assert calls == [((28, 42), (1, 4))]
    finally:
        model.finalize()
    calls.clear()
    model.initialize({"model_config": json.dumps({**config, **_config(PRESET="tiny", DEVICE="cpu")}), "model_instance_kind": "CPU"})
    model.finalize()
    assert calls == []  # off by default on a CPU instance
