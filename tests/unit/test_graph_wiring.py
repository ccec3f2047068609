"""The CUDA-graph wiring on a CPU model: every part that would replay a graph (whole parts, and
the two halves of the blocks whose attention reads a cache) runs its eager form off CUDA, so a
graphed model streams bit for bit like a plain one, compiled or not. The capture itself needs a
GPU (tests/gpu/test_cuda_graphs.py)."""

from __future__ import annotations

import torch

from stac_backend.cache import CacheConfig
from stac_backend.engine.stream import Stream
from stac_backend.model import build_model
from stac_backend.model.compiled import compile_static_parts
from stac_backend.model.cuda_graphs import CacheBlockGraphs, GraphedForward, graph_static_parts
from stac_backend.model.layers import Block

FILLING = CacheConfig(policy="stac", chunk=2, window=2, hh=2, conf_threshold=0.0, retrieval_start_frame=0, retrieval_every=1)


def _stream(model, steps: int = 3) -> list[dict]:
    stream = Stream(model, cache=FILLING)
    g = torch.Generator().manual_seed(3)
    frames = torch.randint(0, 256, (steps, stream.chunk_size, 3, 56, 84), dtype=torch.uint8, generator=g)
    with torch.inference_mode():
        return [stream.push(step) for step in frames]


def _assert_same(a: list[dict], b: list[dict], exact: bool) -> None:
    for step, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys()
        for name, value in x.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                if exact:
                    assert torch.equal(value, y[name]), f"{name} at step {step}"
                else:
                    torch.testing.assert_close(y[name], value, rtol=1e-4, atol=1e-5, msg=f"{name} at step {step}")


def test_every_part_gets_its_graphs_and_the_cache_blocks_two_halves():
    model = build_model("tiny", seed=0)
    graph_static_parts(model)
    agg = model.aggregator
    assert isinstance(agg.patch_embed.forward, GraphedForward)
    assert all(isinstance(b.forward, GraphedForward) for b in agg.frame_blocks)
    assert all(isinstance(b.forward, CacheBlockGraphs) for b in agg.global_blocks)
    assert all(isinstance(b.forward, CacheBlockGraphs) for b in model.camera_head.trunk)
    assert isinstance(model.depth_head.forward, GraphedForward)
    assert sorted(model.state_dict()) == sorted(build_model("tiny", seed=0).state_dict())


def test_block_halves_equal_the_block():
    block = Block(64, 4, qk_norm=True, init_values=0.5).eval()
    x = torch.randn(2, 10, 64)
    attend = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
    halves = block.attention_outputs(x, attend(*block.attention_inputs(x)))
    assert torch.equal(block(x, attend=attend), halves)
    assert torch.equal(block(x), halves)  # dense attention is the default


def test_graphed_model_off_cuda_streams_like_the_plain_one():
    plain = _stream(build_model("tiny", seed=0))
    model = build_model("tiny", seed=0)
    stats = graph_static_parts(model)
    _assert_same(plain, _stream(model), exact=True)
    assert stats.captured == 0 and stats.replays == 0 and stats.eager_calls > 0


def test_graphed_compiled_model_off_cuda_uses_the_compiled_halves():
    compiled = build_model("tiny", seed=0)
    compile_static_parts(compiled, backend="aot_eager")
    reference = _stream(compiled)
    model = build_model("tiny", seed=0)
    parts = compile_static_parts(model, backend="aot_eager")
    graph_static_parts(model)
    _assert_same(reference, _stream(model), exact=True)
    # the halves went through the compiled functions, not the block's eager ones
    assert any(s.startswith("qkv_heads") for s in parts.stats.shapes)
    assert any(s.startswith("after_attention") for s in parts.stats.shapes)
    assert parts.stats.eager_calls == 0
