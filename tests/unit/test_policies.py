"""Cache policies: exactness with unbounded budgets, hard memory bounds on long streams,
determinism, and configuration errors."""

from __future__ import annotations

import pytest
import torch

from stac_backend.cache import CacheConfig, StacCache, make_cache
from stac_backend.engine import Stream
from stac_backend.engine.stream import cache_geometry
from stac_backend.model import OUTPUT_NAMES

from conftest import make_tiny_model

COMPARED = [n for n in OUTPUT_NAMES if n != "intrinsics"]  # intrinsics derive from pose_enc (compared)


def run(model, frames, cache, chunk=4):
    stream = Stream(model, cache=cache)
    outs, memory = [], []
    for i in range(0, len(frames), chunk):
        outs.append(stream.push(frames[i : i + chunk]))
        memory.append(stream.memory_bytes())
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}, memory, stream


@pytest.fixture(scope="module")
def frames24():
    return torch.rand(24, 3, 56, 84, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def full_run(tiny_model, frames24):
    return run(tiny_model, frames24, "full")[0]


@pytest.mark.parametrize("policy", ["heavy_hitter", "stac", "window", "sink_window"])
def test_unbounded_budget_reproduces_full(tiny_model, frames24, full_run, policy):
    config = CacheConfig.unbounded(policy, len(frames24), retrieval_start_frame=8)
    out, _, stream = run(tiny_model, frames24, config)
    for name in COMPARED:
        diff = (out[name] - full_run[name]).abs().max().item()
        assert diff <= 1e-5, f"{policy}: {name} differs by {diff}"
    assert stream.cache.stats().get("evicted_tokens", 0) == 0


@pytest.mark.parametrize("policy", ["heavy_hitter", "stac", "window", "sink_window"])
def test_bounded_policies_differ_from_full(tiny_model, frames24, full_run, policy):
    """Sanity: with the reference (small) sizes the policies really evict and change the output."""
    out, _, _ = run(tiny_model, frames24, CacheConfig(policy=policy, window=4, hh=1))
    assert (out["pose_enc"] - full_run["pose_enc"]).abs().max() > 1e-4


def test_full_cache_with_spare_capacity_equals_exact(tiny_model, frames24, full_run):
    """Appending in place into a growing buffer gives the very same outputs as re-making the cache;
    memory_bytes counts the held capacity, used_bytes the exact content."""
    exact_out, _, exact_stream = run(tiny_model, frames24, "full")
    stream = Stream(tiny_model, cache=CacheConfig(policy="full", full_growth=1.5))
    outs, buffers = [], set()
    for i in range(0, len(frames24), 4):
        outs.append(stream.push(frames24[i : i + 4]))
        buffers.add(stream.cache.keys[0].data_ptr())
    for name in OUTPUT_NAMES:
        assert torch.equal(torch.cat([o[name] for o in outs]), exact_out[name]), name
    exact_cache, cache = exact_stream.cache, stream.cache
    assert cache.used_bytes() == exact_cache.used_bytes() == exact_cache.memory_bytes()
    assert cache.num_tokens() == exact_cache.num_tokens() == 24 * tiny_model.config.tokens_per_frame(56, 84)
    assert exact_cache.used_bytes() <= cache.memory_bytes() <= 1.5 * exact_cache.used_bytes()
    assert len(buffers) < len(outs)  # some steps appended in place, without a new buffer


def test_stac_is_bit_identical_across_runs(tiny_model, frames24):
    config = CacheConfig(policy="stac", voxel_size=1e-3, conf_threshold=0.0, retrieval_start_frame=8)
    a, mem_a, _ = run(tiny_model, frames24, config)
    b, mem_b, _ = run(tiny_model, frames24, config)
    for name in OUTPUT_NAMES:
        assert torch.equal(a[name], b[name]), name
    assert mem_a == mem_b


@pytest.fixture(scope="module")
def small_model():
    return make_tiny_model(seed=5)


def test_long_stream_memory_bounds(small_model):
    """300 frames: full grows linearly, window policies stay flat, stac stays under its bound."""
    frames = torch.rand(300, 3, 28, 42, generator=torch.Generator().manual_seed(4))
    budget = 1_000_000
    configs = {
        "full": CacheConfig(policy="full"),
        "window": CacheConfig(policy="window", window=8),
        "sink_window": CacheConfig(policy="sink_window", window=8),
        # tiny voxels + low confidence bar: evicted tokens spread over many voxels and fill the pool
        "stac": CacheConfig(policy="stac", voxel_size=3e-3, conf_threshold=0.0, retrieval_start_frame=16,
                            buffer_size=2, memory_budget_bytes=budget),
    }
    memory, streams = {}, {}
    for name, config in configs.items():
        _, memory[name], streams[name] = run(small_model, frames, config)
    steps = len(memory["full"])
    per_step = memory["full"][1] - memory["full"][0]
    assert all(memory["full"][i] == memory["full"][0] + i * per_step for i in range(steps))
    # flat once the camera-trunk window (64 frames = 16 steps) is full
    for name in ("window", "sink_window"):
        assert len(set(memory[name][17:])) == 1, f"{name} memory not flat: {memory[name][15:20]}"
        assert max(memory[name]) <= streams[name].memory_bound()
    stac = streams["stac"].cache
    bound = streams["stac"].memory_bound()
    assert bound <= budget
    assert max(memory["stac"]) <= bound
    stats = stac.stats()
    assert stats["pool_evicted_voxels"] > 0, stats  # the voxel cap was actually reached
    assert stats["retrieved_per_head"] > 0, stats
    assert memory["stac"][-1] < memory["full"][-1] / 5


def test_budget_too_small_is_refused_without_harm(tiny_model, frames24):
    stream = Stream(tiny_model, cache=CacheConfig(policy="stac", memory_budget_bytes=10_000))
    with pytest.raises(ValueError, match="memory budget"):
        stream.push(frames24[:4])
    assert stream.frames_seen == 0 and stream.memory_bytes() == 0
    hh = Stream(tiny_model, cache=CacheConfig(policy="heavy_hitter", memory_budget_bytes=1000))
    with pytest.raises(ValueError, match="memory budget"):
        hh.push(frames24[:4])


def test_budget_sets_pool_size(tiny_model):
    geometry = cache_geometry(tiny_model)
    tokens = tiny_model.config.tokens_per_frame(56, 84)
    small = StacCache(CacheConfig(memory_budget_bytes=5_000_000, max_voxels=None), geometry)
    large = StacCache(CacheConfig(memory_budget_bytes=50_000_000, max_voxels=None), geometry)
    assert 0 < small.pool_voxels(tokens) < large.pool_voxels(tokens)
    assert small.bytes_bound(tokens) <= 5_000_000
    capped = StacCache(CacheConfig(memory_budget_bytes=50_000_000, max_voxels=10), geometry)
    assert capped.pool_voxels(tokens) == 10


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"policy": "lru"}, "unknown cache policy"),
        ({"window": 0}, "window"),
        ({"hh": -1}, "hh"),
        ({"voxel_size": 0.0}, "voxel_size"),
        ({"voxel_size": -0.05}, "voxel_size"),
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": 1.5}, "gamma"),
        ({"chunk": 8, "window": 4}, "chunk"),
        ({"max_voxels": 0}, "max_voxels"),
        ({"memory_budget_bytes": 0}, "memory_budget_bytes"),
        ({"memory_budget_bytes": -5}, "memory_budget_bytes"),
        ({"retrieval_every": 0}, "retrieval_every"),
        ({"mass_query_stride": 0}, "mass_query_stride"),
        ({"policy": "full", "full_growth": 0.5}, "full_growth"),
        ({"policy": "full", "full_growth": float("nan")}, "full_growth"),
    ],
)
def test_invalid_configuration_is_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        CacheConfig(**changes)


def test_policy_rejects_batched_input(tiny_model):
    cache = make_cache(CacheConfig(policy="window"), cache_geometry(tiny_model))
    q = torch.rand(2, 4, 5, 16)
    with pytest.raises(ValueError, match="batch size"):
        cache.attend(0, q, q, q)


@pytest.mark.parametrize("policy", ["full", "window", "heavy_hitter", "stac"])
def test_streams_batched_in_one_step_equal_separate_streams(tiny_model, policy):
    """Three streams at different points of their lives share each step; each equals its solo run."""
    from stac_backend.engine import push_many

    g = torch.Generator().manual_seed(11)
    videos = [torch.rand(20, 3, 56, 84, generator=g) for _ in range(3)]
    starts = [0, 4, 8]  # stream b joins at step starts[b] // 4
    config = CacheConfig(policy=policy, retrieval_start_frame=8, voxel_size=1e-2, conf_threshold=0.0)
    solo = [run(tiny_model, v, config)[0] for v in videos]
    streams = [Stream(tiny_model, cache=config) for _ in videos]
    got = [[] for _ in videos]
    for step in range(0, 28, 4):
        active = [b for b in range(3) if starts[b] <= step < starts[b] + 20]
        chunks = [streams[b].validate(videos[b][step - starts[b] : step - starts[b] + 4]) for b in active]
        for b, out in zip(active, push_many([streams[b] for b in active], chunks)):
            got[b].append(out)
    for b in range(3):
        merged = {k: torch.cat([o[k] for o in got[b]]) for k in got[b][0]}
        for name in COMPARED:
            diff = (merged[name] - solo[b][name]).abs().max().item()
            assert diff <= 1e-4, f"stream {b} {name} differs by {diff}"


def test_stac_pool_work_per_step_is_bounded(small_model):
    """Every point in one voxel (the random-weights pathology): one batched pool insert per step
    for all layers; what does not fit the buffers is carried over up to ``pool_carry_slots`` per
    voxel row and the rest dropped and counted."""
    frames = torch.rand(40, 3, 28, 42, generator=torch.Generator().manual_seed(6))
    config = CacheConfig(policy="stac", voxel_size=1e3, conf_threshold=0.0, retrieval_start_frame=8, pool_carry_slots=2,
                         buffer_size=2)
    _, _, stream = run(small_model, frames, config)
    stats = stream.cache.stats()
    steps_with_evictions = len(frames) // 4 - 1  # the first step fits pinned + window + hh
    assert stats["pool_voxels"] <= 8
    assert stats["pool_insert_calls"] == steps_with_evictions, stats
    assert 0 < stats["pool_carried_tokens"] <= 2 * stats["pool_voxels"] * 4 * 4  # rows: voxels x layers x heads
    assert stats["pool_overflow_dropped_tokens"] > 0  # the bound was actually reached


def test_heavy_hitter_hands_over_evictions_in_store_order_and_keeps_true_token_ids(tiny_model, frames24):
    """Evicted tokens reach ``on_evict`` head by head, ascending within a head (``stac`` pools them
    in that order), and every kept token still names its own frame and in-frame index (the step's
    new-token ids are shared by the layers)."""
    stream = Stream(tiny_model, cache=CacheConfig(policy="heavy_hitter", window=4, hh=1))
    cache, seen = stream.cache, []
    cache.on_evict = lambda layer, store, heads, tokens, info: seen.append((heads.clone(), tokens.clone()))
    for start in range(0, len(frames24), 4):
        stream.push(frames24[start : start + 4])
        latest = start + 3
        for store in cache.layers.values():
            frames = store.frame.long()
            assert frames.max().item() <= latest and frames.min().item() >= 0
            assert (frames == latest).sum(dim=1).min().item() > 0  # every head keeps the newest frame
            tokens_per_frame = int(store.index.max().item()) + 1
            pairs = frames * tokens_per_frame + store.index.long()
            assert all(len(set(row.tolist())) == row.numel() for row in pairs)  # no (frame, index) twice in a head
    assert seen
    for heads, tokens in seen:
        H = int(heads.max().item()) + 1
        per_head = tokens.view(H, -1)
        assert torch.equal(heads.view(H, -1), torch.arange(H)[:, None].expand_as(per_head))
        assert torch.equal(per_head, per_head.sort(dim=1).values)
