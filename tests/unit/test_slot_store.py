"""The slot store (``CacheConfig.store="slots"``) against the default one: same outputs (to float
rounding: the attention sums its keys in another order), the same tokens kept per (layer, head)
after every step, the same evictions filed into the voxel pool in the same order, the same
exported state, and a store that never leaves its preallocated buffers."""

from __future__ import annotations

import pytest
import torch

from stac_backend.cache import CacheConfig, slot_store, stac
from stac_backend.cache.slot_store import SlotLayerTokens, commit_layers
from stac_backend.engine import Stream
from stac_backend.engine.stream import push_many
from stac_backend.model import OUTPUT_NAMES

COMPARED = [n for n in OUTPUT_NAMES if n != "intrinsics"]  # intrinsics derive from pose_enc (compared)
# 13 steps of 2 frames with a short (1-frame) chunk in the middle and at the end: evictions from
# step 3 on, retrieval from frame 4, and steps where the slot store is not full (masked keys).
CHUNKS = [2, 2, 2, 2, 2, 1, 2, 2, 2, 2, 2, 2, 1]
SMALL = dict(chunk=2, window=2, hh=1, retrieval_start_frame=4, voxel_size=0.05, conf_threshold=0.0, buffer_size=2,
             max_pivots=2)


@pytest.fixture(scope="module")
def frames():
    return torch.rand(sum(CHUNKS), 3, 56, 84, generator=torch.Generator().manual_seed(5))


def config(policy: str, store: str, **overrides) -> CacheConfig:
    return CacheConfig(policy=policy, store=store, **{**SMALL, **overrides})


def kept(store) -> tuple[torch.Tensor, torch.Tensor]:
    """(frame, index) [H, N] of the tokens a layer holds, in (frame, index) order per head."""
    if isinstance(store, SlotLayerTokens):
        store = store.compact()
    return store.frame, store.index


LAYOUT = ("cache.hot_slot", "cache.hot_capacity", "hot_slot", "hot_capacity")  # a slot store's own layout


def content(state: dict) -> dict:
    """A state without the slot layout: what both stores hold."""
    return {name: t for name, t in state.items() if name not in LAYOUT}


def assert_states_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        if a[name].is_floating_point():
            torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5, equal_nan=True, msg=name)
        else:
            assert torch.equal(a[name], b[name]), name


def run_pair(model, frames, policy, **overrides):
    """Both stores side by side, comparing what they keep after every step."""
    streams = {store: Stream(model, cache=config(policy, store, **overrides)) for store in ("compact", "slots")}
    outs = {store: [] for store in streams}
    start, capacity, buffers = 0, None, None
    P = model.config.tokens_per_frame(56, 84)
    for step, n in enumerate(CHUNKS):
        for store, stream in streams.items():
            outs[store].append(stream.push(frames[start : start + n]))
        start += n
        compact, slots = streams["compact"].cache, streams["slots"].cache
        assert sorted(compact.layers) == sorted(slots.layers)
        for layer in compact.layers:
            f_a, i_a = kept(compact.layers[layer])
            f_b, i_b = kept(slots.layers[layer])
            assert torch.equal(f_a, f_b) and torch.equal(i_a, i_b), f"step {step}, layer {layer}: kept tokens differ"
        # The slot store stays in its first buffers, at the capacity it was made with.
        stores = list(slots.layers.values())
        assert all(isinstance(s, SlotLayerTokens) for s in stores)
        if capacity is None:
            capacity = stores[0].capacity
            buffers = [s.k.data_ptr() for s in stores]
            held = slots.memory_bytes()
        assert [s.k.data_ptr() for s in stores] == buffers
        assert all(s.capacity == capacity and s.num_tokens <= capacity for s in stores)
        if policy == "heavy_hitter":
            assert slots.memory_bytes() == held  # nothing is allocated after the first step
        stream = streams["slots"]
        assert stream.memory_bytes() <= stream.memory_bound()
        assert slots.memory_bytes() <= slots.resting_bytes_bound(P)
        assert compact.stats()["evicted_tokens"] == slots.stats()["evicted_tokens"]
    # the resting bound (pinned + window + hh frames): the step's new tokens are staged beside it
    c = streams["slots"].cache.config
    assert capacity == (len(c.pinned_frames) + c.window + c.hh) * P
    joined = {store: {k: torch.cat([o[k] for o in outs[store]]) for k in COMPARED} for store in outs}
    return joined, streams


@pytest.mark.parametrize("policy", ["heavy_hitter", "stac"])
def test_slots_match_the_default_store(tiny_model, frames, policy):
    outs, streams = run_pair(tiny_model, frames, policy)
    for name in COMPARED:
        torch.testing.assert_close(outs["slots"][name], outs["compact"][name], atol=1e-5, rtol=1e-5, msg=name)
    compact, slots = streams["compact"].cache, streams["slots"].cache
    assert compact.stats()["evicted_tokens"] > 0
    assert_states_equal(compact.export_state(), content(slots.export_state()))
    if policy == "stac":
        stats = compact.stats()
        assert stats["pool_pivots"] > 0 and stats["pooled_tokens"] > 0, stats  # the pool was really used
        others = slots.stats()
        for name in stats:
            if name not in ("memory_bytes",):
                assert stats[name] == others[name], name
        # The pool received the same tokens in the same order: its whole state agrees.
        assert_states_equal(compact.pool.export_state(), slots.pool.export_state())


def test_commit_places_kept_staged_tokens_and_sinks_the_rest():
    """The store's own end of step, driven directly: evicted slots free up, the kept staged tokens
    fill the lowest free slots of their head, staged tokens not kept (a head may keep fewer of
    them than another) land in the sink and never count. (Through a stream every staged token is
    kept: a chunk never exceeds the recent window, which protects it.)"""
    H, S, D = 2, 4, 3
    store = SlotLayerTokens.empty(H, S, D, torch.float32, "cpu", with_position=False)
    ids = lambda *f: torch.tensor([f] * H, dtype=torch.int32)
    store.stage(torch.arange(H * 3 * D, dtype=torch.float32).view(H, 3, D), torch.zeros(H, 3, D), ids(0, 0, 0), ids(0, 1, 2), None)
    store.keys()
    store.absorb_scores(torch.zeros(H, 3), 0, 0, 1.0)  # (the attention's mass, as a step hands it over)
    commit_layers([store])  # no pruning: a prefix of 3
    assert store.num_tokens == 3 and store.prefix and torch.equal(store.frame[:, :3], ids(0, 0, 0))
    new_k = 100 + torch.arange(H * 2 * D, dtype=torch.float32).view(H, 2, D)
    store.stage(new_k, torch.zeros(H, 2, D), ids(1, 1), ids(0, 1), None)
    store.keys()
    store.absorb_scores(torch.zeros(H, 5), 0, 0, 1.0)
    assert store.num_tokens == 5
    first_new = S + 1  # combined index of staged token 0
    # head 0 evicts slot 1 and staged token 1; head 1 evicts slots 0 and 2 and keeps both staged
    kept = torch.tensor([[0, 2, first_new, 3], [1, first_new, first_new + 1, 3]])
    evicted = torch.tensor([[1, first_new + 1], [0, 2]])
    commit_layers([store], kept[None, :, :3], evicted[None])
    assert store.num_tokens == 3 and not store.prefix and store.staged is None
    assert torch.equal(store.frame[0], torch.tensor([0, 1, 0, -1, -1], dtype=torch.int32))  # staged 0 -> slot 1
    assert torch.equal(store.k[0, 1], new_k[0, 0])
    assert torch.equal(store.frame[1], torch.tensor([1, 0, 1, -1, -1], dtype=torch.int32))  # slots 0 and 2
    assert torch.equal(store.k[1, 0], new_k[1, 0]) and torch.equal(store.k[1, 2], new_k[1, 1])
    assert torch.equal(store.live().sum(1), torch.tensor([3, 3]))


def test_a_stream_ends_each_step_of_all_layers_at_once(tiny_model, frames, monkeypatch):
    """A stream's slot stores are views of one arena, and the end of a step (evictions or not)
    takes the evicted tokens of every layer and writes every layer at once: one take and one write
    per step, on [layers, heads, ...] tensors. Between steps the step's staged buffer is gone."""
    stream = Stream(tiny_model, cache=config("stac", "slots"))
    calls = []

    def counted(name):
        original = getattr(slot_store, name)

        def wrapper(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(slot_store, "_commit", counted("_commit"))
    monkeypatch.setattr(stac, "take_layers", counted("take_layers"))
    start = 0
    for n in CHUNKS[:8]:
        calls.clear()
        evicted = stream.cache.evicted_tokens
        stream.push(frames[start : start + n])
        start += n
        evicting = stream.cache.evicted_tokens > evicted
        assert calls == (["take_layers", "_commit"] if evicting else ["_commit"])
        stores = list(stream.cache.layers.values())
        arena = stores[0].arena
        assert all(s.arena is arena for s in stores) and [s.layer for s in stores] == list(range(len(stores)))
        assert arena.staged_k is None and all(s.staged is None for s in stores)
    assert stream.cache.stats()["evicted_tokens"] > 0


def test_slot_state_round_trip(tiny_model, frames):
    """A slot stream's exported state records its layout: a new slot stream continues bit for bit; a
    compact stream takes the same tokens and continues to float rounding (it sums its keys in time
    order); a slot stream given the state without its layout too (the tokens fill its first slots)."""
    cache = config("stac", "slots")
    original = Stream(tiny_model, cache=cache)
    for i in range(0, 10, 2):
        original.push(frames[i : i + 2])
    state = original.export_state()
    assert "cache.hot_slot" in state and not original.cache.layers[0].prefix  # a layout worth restoring
    restored = {}
    for name, store, given in (("exact", "slots", state), ("compact", "compact", state),
                               ("no layout", "slots", content(state))):
        restored[name] = Stream(tiny_model, cache=config("stac", store))
        restored[name].import_state(given)
        assert_states_equal(content(restored[name].export_state()), content(state))
    assert_states_equal(restored["exact"].export_state(), state)
    assert restored["exact"].memory_bytes() == original.memory_bytes()
    expected = original.push(frames[10:12])
    for name, stream in restored.items():
        out = stream.push(frames[10:12])
        for output in COMPARED:
            if name == "exact":
                assert torch.equal(out[output], expected[output]), output
            else:
                torch.testing.assert_close(out[output], expected[output], atol=1e-5, rtol=1e-5, msg=output)


def test_a_bad_slot_layout_is_refused(tiny_model, frames):
    stream = Stream(tiny_model, cache=config("stac", "slots"))
    for i in range(0, 6, 2):
        stream.push(frames[i : i + 2])
    state = stream.export_state()
    slots = state["cache.hot_slot"].clone()
    slots[0, 0, 1] = slots[0, 0, 0]  # two tokens in one slot
    with pytest.raises(ValueError, match="distinct indices"):
        Stream(tiny_model, cache=config("stac", "slots")).import_state({**state, "cache.hot_slot": slots})
    with pytest.raises(ValueError, match="come together"):
        Stream(tiny_model, cache=config("stac", "slots")).import_state(
            {n: t for n, t in state.items() if n != "cache.hot_capacity"})


def test_batched_slot_streams_match_alone(tiny_model, frames):
    """Slot streams at different points of their streams (full, masked and prefix stores) in one
    batched step give what each gives alone."""
    def streams_at(lengths):
        out = []
        for n in lengths:
            s = Stream(tiny_model, cache=config("stac", "slots"))
            start = 0
            for c in CHUNKS:
                if start + c > n:
                    break
                s.push(frames[start : start + c])
                start += c
            out.append(s)
        return out

    lengths = [0, 11, 6]  # fresh; after the short chunk (free slots: masked); steady state
    batched, alone = streams_at(lengths), streams_at(lengths)
    chunk = frames[20:22]
    outs = push_many(batched, [s.validate(chunk) for s in batched])
    for b, s in enumerate(alone):
        ref = s.push(chunk)
        for name in COMPARED:
            torch.testing.assert_close(outs[b][name], ref[name], atol=1e-5, rtol=1e-5, msg=f"stream {b}: {name}")
        assert_states_equal(content(batched[b].cache.export_state()), content(s.cache.export_state()))


def test_store_is_validated():
    with pytest.raises(ValueError, match=r"store must be one of \('compact', 'slots'\)"):
        CacheConfig(policy="stac", store="ring")
    with pytest.raises(ValueError, match="heavy_hitter and stac"):
        CacheConfig(policy="window", store="slots")
    assert CacheConfig().store == "compact"
