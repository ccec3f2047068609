"""CUDA graphs of the cache-free parts change nothing but speed: graphed streaming equals eager
streaming, a step's outputs stay valid after the next step, big or autograd calls run eagerly.
The GPU cases need CUDA; the pass-through cases run anywhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stac_backend.engine import Stream, push_many
from stac_backend.model import build_model, config_with, get_preset
from stac_backend.model.cuda_graphs import GraphedForward, GraphSet, GraphStats, graph_static_parts, leading_frames

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def test_cpu_model_gets_no_graphs():
    model = build_model("tiny", device="cpu")
    assert not hasattr(model, "cuda_graph_stats")
    assert not isinstance(model.aggregator.frame_blocks[0].__dict__.get("forward"), GraphedForward)


def test_graphed_forward_runs_cpu_and_autograd_calls_eagerly():
    layer = nn.Linear(8, 8)
    stats = GraphStats()
    layer.forward = GraphedForward(layer, "linear", layer.forward, GraphSet(None, stats, max_frames=8), leading_frames)
    x = torch.randn(4, 8)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))  # autograd on
    with torch.inference_mode():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))  # CPU tensors
    assert stats.eager_calls == 2 and stats.captured == 0
    assert "weight" in dict(layer.named_parameters())  # the module tree is untouched


def _model(graphs: bool):
    config = config_with(get_preset("tiny"), init_values=1.0, camera_init_values=1.0)
    return build_model(config, device="cuda", seed=0, cuda_graphs=graphs)


def _graphs_and_replays_per_step(config) -> tuple[int, int]:
    """Graphs of one input shape and their replays per step: the patch embedding, every frame block
    and both DPT heads whole; every global block and camera-trunk block in two halves (the trunk
    runs once per refinement iteration)."""
    captured = 1 + config.depth + 2 + 2 * config.depth + 2 * config.camera_trunk_depth
    return captured, captured + 2 * config.camera_trunk_depth * (config.camera_iterations - 1)


def _frames(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 3, 56, 84, generator=torch.Generator().manual_seed(seed)).cuda()


@needs_cuda
@pytest.mark.parametrize("policy", ["full", "stac"])
def test_graphed_stream_equals_eager(policy):
    graphed, eager = _model(True), _model(False)
    assert not hasattr(eager, "cuda_graph_stats")
    frames = _frames(16, 1)
    streams = [Stream(graphed, chunk_size=4, cache=policy), Stream(eager, chunk_size=4, cache=policy)]
    kept = []
    for start in range(0, 16, 4):
        out_graphed, out_eager = (s.push(frames[start : start + 4]) for s in streams)
        for name in out_eager:
            torch.testing.assert_close(out_graphed[name], out_eager[name], rtol=1e-5, atol=1e-5, msg=f"{name} at frame {start}")
        kept.append((out_graphed["depth"].clone(), out_graphed["depth"]))
    # Outputs are copies: later replays did not overwrite what an earlier step returned.
    for copy, returned in kept:
        assert torch.equal(copy, returned)
    stats = graphed.cuda_graph_stats
    captured, replays = _graphs_and_replays_per_step(graphed.config)
    assert stats.failed == []
    assert stats.captured == captured  # each once: one shape
    assert stats.replays == 4 * replays


@needs_cuda
def test_batched_steps_graph_small_batches_and_run_big_ones_eagerly():
    graphed, eager = _model(False), _model(False)
    stats = graph_static_parts(graphed, max_frames=8)
    frames = _frames(12, 2)
    streams = {m: [Stream(m, chunk_size=4, cache="stac") for _ in range(3)] for m in (graphed, eager)}
    # two streams: 8 frames per call (graphed); three streams: 12 frames (eager)
    for count in (2, 3, 2):
        outs = [push_many(streams[m][:count], [frames[4 * i : 4 * i + 4] for i in range(count)]) for m in (graphed, eager)]
        for a, b in zip(*outs):
            for name in b:
                torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5)
    captured, calls_per_step = _graphs_and_replays_per_step(graphed.config)
    assert stats.failed == []
    assert stats.captured == captured
    assert stats.eager_calls == calls_per_step  # the one three-stream step


@needs_cuda
@pytest.mark.parametrize("graphs", ["1", "0", "auto"])
def test_serving_cuda_graphs_parameter_and_warmup_captures(monkeypatch, graphs):
    """CUDA_GRAPHS=1 on a GPU instance (compiling by default) gives the compiled model graphs, and
    after the warm-up a one-stream step captures and compiles nothing new; 0 and auto (with
    STAC_CUDA_GRAPHS unset) give none."""
    from stac_backend.serving.triton_model import build_sessions

    monkeypatch.delenv("STAC_COMPILE", raising=False)
    monkeypatch.delenv("STAC_CUDA_GRAPHS", raising=False)
    config = {"parameters": {"PRESET": {"string_value": "tiny"}, "WARMUP": {"string_value": "56x84"},
                             "CACHE_CONFIG": {"string_value": '{"policy": "stac"}'},
                             "CUDA_GRAPHS": {"string_value": graphs}}}
    runtime = build_sessions(config, "KIND_GPU", 0, None).runtime
    model = runtime.model
    assert model.compiled_parts is not None  # COMPILE auto: on for a GPU instance that warms up
    if graphs != "1":
        assert not hasattr(model, "cuda_graph_stats")
        return
    runtime.warmup((56, 84), (1, 2))
    captured, signatures = model.cuda_graph_stats.captured, model.compiled_parts.stats.signatures
    assert captured > 0
    stream = runtime.open_stream()
    for t in range(3):
        runtime.step([stream], [stream.validate(_frames(4, 10 + t))])
    assert model.cuda_graph_stats.captured == captured  # the warm-up captured the one-stream shapes
    assert model.compiled_parts.stats.signatures == signatures
    assert model.cuda_graph_stats.replays > 0
