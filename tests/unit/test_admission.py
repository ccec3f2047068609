"""Admission arithmetic: how many default ``stac`` streams of vggt-1b one 80 GB H100 admits.

No GPU: the streams' bounds come from the configurations (exact, see test_cache_state.py) and the
model's weights and a micro-batch step's memory from the recorded H100 benchmark
(docs/benchmarks/engine_streams_h100.json, measured by ``TorchRuntime.warmup``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stac_backend.cache import CacheConfig, make_cache
from stac_backend.engine import (admission_reserve_bytes, geometry_of, stream_memory_bound, stream_resting_memory_bound,
                                 streams_that_fit)
from stac_backend.engine.admission import charged_bound
from stac_backend.model import get_preset

from conftest import load_script

GIB = 2**30
HW = (392, 518)


# benchmarks/streams_per_gpu.py: the recorded H100 figures and a stream's step outputs
CAPACITY = load_script(Path(__file__).resolve().parents[2] / "benchmarks" / "streams_per_gpu.py", "streams_per_gpu")
recorded_h100 = CAPACITY.recorded_h100
step_output_bytes = CAPACITY.step_output_bytes


def test_48_default_stac_streams_are_admitted_within_78_gib():
    model = get_preset("vggt-1b")
    cache = CacheConfig()  # the default: stac
    assert cache.policy == "stac"
    model_bytes, step_bytes = recorded_h100()
    resting = stream_resting_memory_bound(model, cache, HW, torch.bfloat16)
    outputs = step_output_bytes(cache.chunk, HW)
    assert streams_that_fit(78 * GIB, resting + outputs, step_bytes, model_bytes) >= 48
    # and the admission rule itself: 48 streams' charges and one step leave room for the model
    charged = charged_bound(stream_memory_bound(model, cache, HW, torch.bfloat16), resting, step_bytes, outputs)
    assert charged == resting + outputs
    assert model_bytes + admission_reserve_bytes([charged] * 48, step_bytes) <= 78 * GIB


def test_the_bound_by_part_for_vggt_1b():
    """The parts docs/performance.md tabulates, and how they add up."""
    model = get_preset("vggt-1b")
    cache = CacheConfig()
    policy = make_cache(cache, geometry_of(model, torch.bfloat16))
    P = model.tokens_per_frame(*HW)
    parts = policy.bound_parts(P)
    camera = stream_memory_bound(model, cache, HW, torch.bfloat16) - policy.bytes_bound(P)
    # keys and values of (pinned + window + hh) frames in 24 layers x 16 heads, 24 bytes of bookkeeping each
    assert parts["hot_resting"] == 24 * 16 * (1 + 4 + 2) * P * (2 * 64 * 2 + 24)
    assert parts["hot_step_chunk"] == 24 * 16 * cache.chunk * P * (2 * 64 * 2 + 24)
    assert stream_resting_memory_bound(model, cache, HW, torch.bfloat16) == sum(parts.values()) - parts["hot_step_chunk"] + camera
    assert 0 < camera < 10 * 2**20


def test_without_a_measured_step_each_stream_is_charged_its_in_step_bound():
    assert charged_bound(100, 60, step_bytes=None) == 100
    assert charged_bound(100, 60, step_bytes=5) == 60
    assert charged_bound(100, 60, step_bytes=5, output_bytes=7) == 67
    assert charged_bound(None, None, step_bytes=5) is None
    assert admission_reserve_bytes([60, 60], 5) == 125
    assert streams_that_fit(125, 60, 5) == 2 and streams_that_fit(124, 60, 5) == 1
    with pytest.raises(ValueError):
        streams_that_fit(100, 0)


def test_the_capacity_table_of_the_docs():
    """benchmarks/streams_per_gpu.py prints docs/performance.md's table of streams per 80 GB H100."""
    assert [(r["max_voxels"], r["streams"]) for r in CAPACITY.capacity_rows(78 * GIB)] == [(256, 53), (320, 48), (384, 44), (512, 37)]
