"""Every cache states its memory bound exactly and exports / imports its state as plain tensors.

The policies are driven directly (random keys, values and world points; no model) so that long
streams stay fast: a bound must be what the cache really reaches (its peak, measured after each
layer's attention and after the end of each step), and a state exported mid-stream and imported
into a fresh cache must continue the stream bit for bit. The stream-level round trip runs the tiny
model.
"""

from __future__ import annotations

import pytest
import torch

from stac_backend.cache import CacheConfig, CacheGeometry, CameraCache, StepInfo, camera_bytes_bound, make_cache
from stac_backend.cache.voxel_pool import VoxelPool
from stac_backend.engine import Stream

L, H, D = 2, 2, 8
PATCH, GRID = 2, (2, 3)  # 2x2-pixel patches on a 2x3 grid: frames of 4x6 pixels
SPECIAL = 1  # tokens before the patches (no position)
P = SPECIAL + GRID[0] * GRID[1]  # tokens per frame
GEOMETRY = CacheGeometry(L, H, D, camera_entries=3, camera_width=8)


def config(policy: str, **changes) -> CacheConfig:
    # No confidence bar and points in [0, 2)^3: evicted tokens spread over 64 voxels, more than
    # the pool's cap (it fills and evicts), yet each voxel is near enough to the recent window's
    # (radius 2) that the candidates hold more pivots than the retrieval budget of P slots.
    sizes = dict(chunk=2, window=2, hh=1, retrieval=1, retrieval_start_frame=4, voxel_size=0.5, conf_threshold=0.0,
                 max_voxels=6, buffer_size=2, max_pivots=2, camera_window=3)
    return CacheConfig(policy=policy, **{**sizes, **changes})


def step_inputs(step: int, chunk: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    M = chunk * P
    qkv = [torch.randn(1, H, M, D, generator=g) for _ in range(3 * L)]
    points = torch.rand(1, chunk, GRID[0] * PATCH, GRID[1] * PATCH, 3, generator=g) * 2.0
    conf = torch.ones(1, chunk, GRID[0] * PATCH, GRID[1] * PATCH)
    return {"qkv": qkv, "points": points, "conf": conf}


def run_steps(policy, first: int, count: int, chunk: int, peaks: list | None = None) -> list[torch.Tensor]:
    """Steps ``first`` .. ``first + count - 1``; returns every attention output."""
    outs = []
    for step in range(first, first + count):
        x = step_inputs(step, chunk)
        info = StepInfo(frame_offset=step * chunk, num_frames=chunk, tokens_per_frame=P, patch_start_idx=SPECIAL,
                        grid_hw=GRID)
        policy.begin_step(info)
        for layer in range(L):
            q, k, v = x["qkv"][3 * layer : 3 * layer + 3]
            outs.append(policy.attend(layer, q, k, v))
            if peaks is not None:
                peaks.append(policy.memory_bytes())
        info.world_points, info.world_points_conf = x["points"], x["conf"]
        policy.end_step(info)
        if peaks is not None:
            peaks.append(policy.memory_bytes())
    return outs


BOUNDED = ["window", "sink_window", "heavy_hitter", "stac"]


@pytest.mark.parametrize("policy", BOUNDED)
def test_bound_is_the_peak_a_long_stream_reaches(policy):
    cache = make_cache(config(policy), GEOMETRY)
    peaks: list[int] = []
    run_steps(cache, 0, 30, chunk=2, peaks=peaks)
    bound = cache.bytes_bound(P)
    assert max(peaks) == bound, (max(peaks), bound)
    assert cache.stats()["evicted_tokens"] > 0


@pytest.mark.parametrize("policy", BOUNDED)
def test_resting_bound_is_the_peak_between_steps(policy):
    """Between steps a bounded store holds no chunk of new tokens: the resting bound is what a long
    stream reaches then, and the in-step bound exceeds it by exactly the chunk's share."""
    cache = make_cache(config(policy), GEOMETRY)
    resting = []
    for step in range(30):
        run_steps(cache, step, 1, chunk=2)
        resting.append(cache.memory_bytes())
    assert max(resting) == cache.resting_bytes_bound(P) < cache.bytes_bound(P)
    if policy == "stac":
        parts = cache.bound_parts(P)
        assert sum(parts.values()) == cache.bytes_bound(P)
        assert cache.bytes_bound(P) - cache.resting_bytes_bound(P) == parts["hot_step_chunk"]


@pytest.mark.parametrize("changes", [{}, {"max_voxels": 3}, {"max_voxels": 1, "include_buffer": True}])
def test_stac_bound_parts_are_each_reached(changes):
    """Retrieval at its budget and the pool at its voxel cap both happen, and the whole bound is
    the stream's peak (the hot store peaks during attention).

    Retrieval returns pivots only, yet its budget counts every token of a frame (special ones
    too, as the reference's ``retrieval x tokens per frame`` slots): the pivots come from many
    frames' patches, so a pool that holds enough pivots near the recent window fills it. A pool
    too small for the budget (3 voxels x 2 pivots < 7 slots; 1 x (2 pivots + 1 buffered)) bounds
    the retrieval by what it can hold."""
    cache = make_cache(config("stac", **changes), GEOMETRY)
    retrieved, pool, peaks = [], [], []
    for step in range(30):
        run_steps(cache, step, 1, chunk=2, peaks=peaks)
        retrieved.append(sum(t.numel() * t.element_size() for r in cache.retrieved.values() for t in r))
        pool.append(cache.pool.memory_bytes())
    c = cache.config
    assert max(pool) == VoxelPool.bytes_for(c.max_voxels, L, H, D, torch.float32, c.buffer_size, c.max_pivots,
                                            c.pool_carry_slots)
    assert max(retrieved) == cache.retrieved_bytes_bound(P, c.max_voxels)
    if changes:
        assert max(retrieved) < cache.retrieved_bytes_bound(P)  # the pool, not the slots, bounds it
    assert max(peaks) == cache.bytes_bound(P)
    assert cache.stats()["pool_evicted_voxels"] > 0


def test_full_cache_is_unbounded_and_grows_by_its_formula():
    from stac_backend.cache import FullCache

    cache = make_cache(config("full", window=4), GEOMETRY)
    assert cache.bytes_bound(P) is None
    sizes = []
    for step in range(5):
        run_steps(cache, step, 1, chunk=2)
        sizes.append(cache.memory_bytes())
    assert all(b - a == 2 * FullCache.bytes_per_frame(GEOMETRY, P) for a, b in zip(sizes, sizes[1:]))


def drive_camera(cache: CameraCache, first: int, count: int, chunk: int, peaks: list | None = None) -> list:
    outs = []
    for step in range(first, first + count):
        g = torch.Generator().manual_seed(50 + step)
        for it in range(3):
            q, k, v = (torch.randn(1, 2, chunk, 4, generator=g) for _ in range(3))
            outs.append(cache.attend(it, 0, q, k, v))
        if peaks is not None:
            peaks.append(cache.memory_bytes())
        cache.end_step(step * chunk)
    return outs


def test_camera_cache_bound_is_its_peak_and_none_when_unbounded():
    cache = CameraCache(config("stac"), GEOMETRY)
    peaks: list[int] = []
    drive_camera(cache, 0, 12, chunk=2, peaks=peaks)
    assert max(peaks) == cache.bytes_bound() == camera_bytes_bound(cache.config, GEOMETRY)
    assert CameraCache(config("full", camera_window=None), GEOMETRY).bytes_bound() is None
    no_camera = CacheGeometry(L, H, D)
    assert CameraCache(config("full", camera_window=None), no_camera).bytes_bound() == 0


def test_camera_cache_state_round_trip():
    cache = CameraCache(config("stac"), GEOMETRY)
    drive_camera(cache, 0, 5, chunk=2)
    copy = CameraCache(config("stac"), GEOMETRY)
    copy.import_state(cache.export_state())
    for a, b in zip(drive_camera(cache, 5, 4, chunk=2), drive_camera(copy, 5, 4, chunk=2)):
        assert torch.equal(a, b)
    assert copy.memory_bytes() == cache.memory_bytes()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal in dtype, shape and every value (NaN where the other has NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def assert_states_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert same(a[name], b[name]), name


@pytest.mark.parametrize("policy, changes", [("full", {"window": 4}), ("full", {"window": 4, "full_growth": 1.5}),
                                             ("window", {}), ("sink_window", {}), ("heavy_hitter", {}), ("stac", {})])
@pytest.mark.parametrize("export_after", [0, 3, 9])
def test_policy_state_round_trip_continues_bit_for_bit(policy, changes, export_after):
    original = make_cache(config(policy, **changes), GEOMETRY)
    run_steps(original, 0, export_after, chunk=2)
    state = original.export_state()
    assert all(isinstance(t, torch.Tensor) for t in state.values())
    restored = make_cache(config(policy, **changes), GEOMETRY)
    restored.import_state(state)
    assert_states_equal(restored.export_state(), state)
    if changes.get("full_growth", 1.0) == 1.0:  # spare capacity (held memory, in stats) is not state
        assert restored.memory_bytes() == original.memory_bytes()
    for a, b in zip(run_steps(original, export_after, 6, chunk=2), run_steps(restored, export_after, 6, chunk=2)):
        assert torch.equal(a, b)
    assert_states_equal(restored.export_state(), original.export_state())
    if changes.get("full_growth", 1.0) == 1.0:
        assert restored.stats() == original.stats()


def test_export_between_steps_only_and_bad_states_are_refused():
    cache = make_cache(config("heavy_hitter"), GEOMETRY)
    run_steps(cache, 0, 2, chunk=2)
    state = cache.export_state()
    cache.begin_step(StepInfo(4, 2, P, SPECIAL, GRID))
    with pytest.raises(RuntimeError, match="between steps"):
        cache.export_state()
    fresh = make_cache(config("heavy_hitter"), GEOMETRY)
    with pytest.raises(ValueError, match="missing \\['hot_score'\\]"):
        fresh.import_state({n: t for n, t in state.items() if n != "hot_score"})
    with pytest.raises(ValueError, match="hot_v"):
        fresh.import_state({**state, "hot_v": state["hot_v"][:, :, :1]})


def test_voxel_pool_state_round_trip_and_specs():
    def pool():
        return VoxelPool(L, H, D, voxel_size=0.5, buffer_size=2, max_pivots=2, max_voxels=8, initial_voxels=2)

    def insert(p, seed):
        g = torch.Generator().manual_seed(seed)
        M = 40
        coords, _ = VoxelPool.voxel_coords(torch.rand(M, 3, generator=g) * 3, torch.ones(M), 0.5, -1.0)
        p.insert(torch.randint(0, L, (M,), generator=g), torch.randint(0, H, (M,), generator=g),
                 torch.randn(M, D, generator=g), torch.randn(M, D, generator=g), torch.rand(M, generator=g), coords, seed)
        return p.retrieve_layers(list(range(L)), coords[:5], 6, seed)

    a = pool()
    for seed in range(4):
        insert(a, seed)
    b = pool()
    b.import_state(a.export_state())
    assert b.stats() == a.stats()
    for seed in range(4, 8):
        for x, y in zip(insert(a, seed), insert(b, seed)):
            assert all(torch.equal(s, t) for s, t in zip(x, y))
    assert b.stats() == a.stats()
    assert_states_equal(a.export_state(), b.export_state())

    specs = VoxelPool.state_specs(8, L, H, D, torch.float32, 2, 2)
    nbytes = sum(torch.empty(s.shape, dtype=s.dtype).nbytes for s in specs.values())
    assert nbytes == VoxelPool.bytes_for(8, L, H, D, torch.float32, 2, 2) == a.memory_bytes()
    data = {n: t for n, t in a.export_state().items() if n in specs}
    c = pool()
    c.import_state(data)  # data alone: statistics start at zero
    assert c.stats()["inserted_tokens"] == 0 and c.memory_bytes() == a.memory_bytes()
    with pytest.raises(ValueError, match="piv_k"):
        pool().import_state({**data, "piv_k": data["piv_k"][:1]})
    with pytest.raises(ValueError, match="rows"):
        VoxelPool(L, H, D, buffer_size=2, max_pivots=2, max_voxels=4).import_state(data)


def test_stream_state_round_trip_with_the_model(tiny_model, frames12):
    """Exported after four steps of the tiny model, imported into a new stream: the fifth step's
    outputs are bit for bit those of the original stream."""
    # Two-frame steps: the pool fills from step 3 on, and step 4 retrieves (before its pruning)
    # what step 3 filed, so the exported state holds both.
    cache = CacheConfig(policy="stac", retrieval_start_frame=4, voxel_size=0.01, conf_threshold=0.0, chunk=2, window=2,
                        hh=1)
    original = Stream(tiny_model, cache=cache)
    for i in range(0, 8, 2):
        original.push(frames12[i : i + 2])
    stats = original.cache.stats()
    assert stats["pool_voxels"] > 0 and stats["retrieved_per_head"] > 0  # the pool and retrieval are in the state
    restored = Stream(tiny_model, cache=cache)
    restored.import_state(original.export_state())
    assert restored.frames_seen == 8 and restored.memory_bytes() == original.memory_bytes()
    assert restored.cache.stats() == stats
    a, b = original.push(frames12[8:10]), restored.push(frames12[8:10])
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("cache", [CacheConfig(policy="stac"), CacheConfig(policy="window"), CacheConfig(policy="full"),
                                   CacheConfig(policy="sink_window", camera_window=None)])
def test_stream_bound_from_the_configurations_alone(tiny_model, cache):
    """A stream's bound sums the policy's and the camera cache's (None where either is unbounded:
    a window policy with an unbounded camera window is unbounded), and the configurations alone
    give the same number as a stream of the model."""
    from stac_backend.engine import stream_memory_bound

    stream = Stream(tiny_model, cache=cache)
    bound = stream_memory_bound(tiny_model.config, cache, (56, 84))
    assert stream.memory_bound((56, 84)) == bound
    if cache.policy == "full" or cache.camera_window is None:
        assert bound is None
    else:
        tokens = tiny_model.config.tokens_per_frame(56, 84)
        assert bound == stream.cache.bytes_bound(tokens) + stream.camera_cache.bytes_bound() > 0
