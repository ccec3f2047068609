"""The exportable step without exporting: the functional step (explicit state, stac:: custom ops)
run eagerly in torch equals the engine; layouts, state budgets and the ops' contracts."""

from __future__ import annotations

import pytest
import torch

from stac_backend.cache import CacheConfig
from stac_backend.engine import Stream
from stac_backend.export.step import FunctionalStep, compact
from stac_backend.graph.layout import StepLayout
from stac_backend.graph.ops import PLUGIN_NAMES
from stac_backend.model import OUTPUT_NAMES

from conftest import make_tiny_model

H, W = 56, 84
COMPARED = [n for n in OUTPUT_NAMES if n != "intrinsics"]  # intrinsics derive from pose_enc (compared)
# the stac defaults (retrieval before pruning, carried-over pool tokens), retrieving from frame 8
STAC = CacheConfig(policy="stac", retrieval_start_frame=8, voxel_size=0.01, conf_threshold=0.0, max_voxels=64)
# the other order, without carry-over (a zero-size carry axis in the state)
STAC_AFTER_PRUNE = STAC.replace(retrieve_before_prune=False, pool_carry_slots=0)


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(seed=3)


@pytest.fixture(scope="module")
def frames20():
    return torch.rand(20, 3, H, W, generator=torch.Generator().manual_seed(21))


def run_functional(model, layout, frames, chunks):
    step = FunctionalStep(model, layout).eval()
    state = layout.empty_state(1)
    outs, offset = [], 0
    for c in chunks:
        with torch.inference_mode():
            res = step(frames[offset : offset + c][None], torch.tensor([offset]), *[state[n] for n in layout.state_names()])
        outs.append(dict(zip(step.output_names, (r[0] for r in res[: len(step.output_names)]))))
        state = dict(zip(layout.state_names(), res[len(step.output_names):]))
        offset += c
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}, state


def run_engine(model, cache, frames, chunks):
    stream = Stream(model, cache=cache)
    outs, offset = [], 0
    for c in chunks:
        outs.append(stream.push(frames[offset : offset + c]))
        offset += c
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}, stream


@pytest.mark.parametrize("cache, chunks", [
    (CacheConfig(policy="full"), [4, 4, 3, 4, 4, 1]),
    (CacheConfig(policy="heavy_hitter", window=4, hh=1), [4] * 5),
    (STAC, [4] * 5),
    (STAC_AFTER_PRUNE, [4] * 5),
])
def test_functional_step_equals_engine(model, frames20, cache, chunks):
    layout = StepLayout(model.config, cache, H, W, max_frames=20)
    got, state = run_functional(model, layout, frames20, chunks)
    want, stream = run_engine(model, cache, frames20, chunks)
    for name in COMPARED:
        diff = (got[name] - want[name]).abs().max().item()
        assert diff <= 1e-5, f"{cache.policy}: {name} differs by {diff}"
    if cache.policy != "full":
        # the hot store holds exactly what the engine's policy holds
        assert int(state["hot_len"][0, 0]) == stream.cache.stats()["tokens_per_head"]
    if cache.policy == "stac":
        assert (state["pool_row_key"] >= 0).sum() == stream.cache.pool.num_voxels > 0
        assert int(state["ret_valid"].sum(-1).max()) == stream.cache.stats()["retrieved_per_head"] > 0
        assert int(state["steps"][0, 0]) == stream.cache.steps == 5
        # the exported pool is the engine's, tensor by tensor (carried-over tokens and LRU stamps included)
        pool = stream.cache.pool
        for name, t in pool.export_state().items():
            if name in ("counters", "device_counters"):
                continue
            torch.testing.assert_close(state["pool_" + name][0], t, msg=name, rtol=0, atol=1e-5)
        if cache.pool_carry_slots:
            assert pool.stats()["carried_tokens"] > 0


def test_layout_budgets_and_names(model):
    layout = StepLayout(model.config, STAC, H, W)
    P = model.config.tokens_per_frame(H, W)
    state = {s.name: s for s in layout.state()}
    assert state["hot_k"].shape[2] == (1 + 4 + 2) * P  # pinned + window + hh frames
    assert state["ret_k"].shape[2] == 2 * P
    assert state["pool_row_key"].shape == (64,)
    assert state["cam_k"].shape[2] == 1 + 64  # pinned + camera_window
    # Triton pairs implicit-state inputs and outputs by sorted name: in_X / out_X sort alike
    names = layout.state_names()
    assert [n[3:] for n in sorted("in_" + n for n in names)] == [n[4:] for n in sorted("out_" + n for n in names)]
    assert StepLayout.from_json(layout.to_json()) == layout
    assert layout.state_bytes() == sum(t.numel() * t.element_size() for t in layout.empty_state(1).values())
    full = StepLayout(model.config, CacheConfig(policy="full"), H, W, max_frames=12)
    assert full.frames_capacity() == 12 and {s.name: s for s in full.state()}["kv_k"].shape[2] == 12 * P


@pytest.mark.parametrize("kwargs, message", [
    (dict(cache=CacheConfig(policy="window")), "cannot be exported"),
    (dict(cache=CacheConfig(policy="full")), "max_frames"),
    (dict(cache=STAC, height=50), "multiples"),
    (dict(cache=STAC.replace(patch_position="mean")), "patch_position='mean' is not exported"),
    (dict(cache=STAC.replace(mass_query_stride=4)), "mass_query_stride=4 is not exported"),
])
def test_layout_refuses_what_cannot_be_exported(model, kwargs, message):
    args = dict(cache=STAC, height=H, width=W)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        StepLayout(model.config, args["cache"], args["height"], args["width"])


def test_compact_keeps_order_and_fills():
    x = torch.arange(12.0).reshape(2, 6)
    keep = torch.tensor([[True, False, True, False, False, True], [False] * 6])
    out = compact(x, keep, 4, 1, fill=-1)
    assert out.tolist() == [[0.0, 2.0, 5.0, -1.0], [-1.0] * 4]


def test_custom_ops_are_registered_and_traceable():
    for name in PLUGIN_NAMES:
        op = getattr(torch.ops.stac, name).default
        assert op._schema.name == f"stac::{name}"
    # the fake implementation gives shapes without data
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k = torch.empty(2, 4, 7, 16), torch.empty(2, 4, 11, 16)
        out, mass = torch.ops.stac.attention(q, k, k, torch.empty(2, 4, 11), torch.empty(2, 4, 11, dtype=torch.bool), 1)
        assert out.shape == (2, 4, 7, 16) and mass.shape == (2, 4, 11)
