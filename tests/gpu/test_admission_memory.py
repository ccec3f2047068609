"""The admission rule on a GPU: streams charged their resting bound plus one measured micro-batch
step never allocate more than that, at every step of a long run (pools full, retrieval running)."""

from __future__ import annotations

import gc

import pytest
import torch

from stac_backend.cache import CacheConfig
from stac_backend.engine import admission_reserve_bytes
from stac_backend.engine.torch_runtime import TorchRuntime
from stac_backend.model import build_model, config_with, get_preset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HW = (56, 84)


@pytest.mark.parametrize("policy", ["stac", "heavy_hitter", "window"])
def test_resting_bounds_and_one_measured_step_hold_every_step(policy):
    config = config_with(get_preset("tiny"), init_values=1.0, camera_init_values=1.0)
    model = build_model(config, device="cuda", seed=0)
    # the stac pool made to fill: every evicted token positioned, retrieval every step, a small pool
    cache = CacheConfig(policy=policy, conf_threshold=0.0, retrieval_start_frame=4, retrieval_every=1, max_voxels=16)
    runtime = TorchRuntime(model, cache, max_batch_streams=3)
    runtime.warmup(HW, batch_sizes=(3,))
    step = runtime.step_memory_bytes(HW)
    streams = [runtime.open_stream() for _ in range(7)]
    resting = streams[0].resting_memory_bound(HW)
    assert resting < streams[0].memory_bound(HW)
    outputs = runtime.step_output_bytes(HW)  # finished micro-batches hold their outputs until the step returns
    assert outputs and outputs > 0
    reserve = admission_reserve_bytes([resting + outputs] * len(streams), step)
    generator = torch.Generator().manual_seed(5)
    for t in range(12):
        chunks = [torch.rand(4, 3, *HW, generator=generator) for _ in streams]
        images = [s.validate(c) for s, c in zip(streams, chunks)]
        gc.collect()
        torch.cuda.synchronize()
        # what is resident besides the caches (weights, this step's input frames) is not admission's
        other = torch.cuda.memory_allocated() - sum(s.memory_bytes() for s in streams)
        torch.cuda.reset_peak_memory_stats()
        runtime.step(streams, images)
        torch.cuda.synchronize()
        used = torch.cuda.max_memory_allocated() - other
        assert used <= reserve, (t, used, reserve)
        assert all(s.memory_bytes() <= resting for s in streams)
