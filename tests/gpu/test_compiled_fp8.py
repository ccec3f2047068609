"""The compiled step and FP8 GEMMs on the GPU: a vggt-1b-shaped model (the real widths, fewer
blocks, conv patch embed) streams the same outputs compiled as eager within bf16 tolerance, and
FP8 stays close to bf16. Needs CUDA (FP8: compute capability 8.9+)."""

from __future__ import annotations

import pytest
import torch

from stac_backend.cache import CacheConfig
from stac_backend.engine import Stream
from stac_backend.engine.torch_runtime import TorchRuntime
from stac_backend.model import build_model, config_with, get_preset
from stac_backend.model.fp8 import Fp8Linear, fp8_unsupported_reason

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_fp8 = pytest.mark.skipif(
    not torch.cuda.is_available() or fp8_unsupported_reason("cuda") is not None, reason="needs an FP8-capable GPU")

# vggt-1b widths (1024-dim tokens, 16 heads, DPT 256 features), 3 frame + 3 global blocks.
CONFIG = config_with(get_preset("vggt-1b"), depth=3, patch_embed="conv", dpt_intermediate_layer_idx=(0, 1, 2, 2),
                     enable_track=False)
HW = (196, 252)
CACHE = CacheConfig(policy="stac", conf_threshold=0.0, retrieval_start_frame=0, retrieval_every=1)


def _model(**switches):
    return build_model(CONFIG, device="cuda", dtype=torch.bfloat16, seed=0, **switches)


def _frames(steps: int, chunk: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (steps, chunk, 3, *HW), dtype=torch.uint8, generator=g)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _stream_outputs(model, steps: int = 5) -> list[dict]:
    stream = Stream(model, cache=CACHE)
    return [{k: v.float().cpu() for k, v in stream.push(f).items()} for f in _frames(steps, stream.chunk_size)]


@needs_fp8
def test_fp8_linear_matches_its_emulation_and_bf16():
    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 4096).cuda().to(torch.bfloat16)
    x = torch.randn(2, 1041, 1024, device="cuda", dtype=torch.bfloat16)  # a row count not a multiple of 16
    reference = linear(x)
    fp8 = Fp8Linear.from_linear(linear)
    emulated = Fp8Linear.from_linear(linear, mode="emulate")
    got = fp8(x)
    assert got.dtype == torch.bfloat16 and got.shape == reference.shape
    assert _relative(got, emulated(x)) < 1e-2
    assert _relative(got, reference) < 8e-2


@needs_fp8
def test_fp8_stream_close_to_bf16(compiled=False):
    bf16 = _stream_outputs(_model(compile=False), steps=3)
    model = _model(compile=compiled, fp8=True)
    assert model.fp8_layers == 4 * 2 * CONFIG.depth
    fp8 = _stream_outputs(model, steps=3)
    for a, b in zip(bf16, fp8):
        assert _relative(b["depth"], a["depth"]) < 0.2
        assert _relative(b["world_points"], a["world_points"]) < 0.2


@needs_cuda
def test_compiled_stream_equals_eager_within_bf16_tolerance():
    eager = _stream_outputs(_model(compile=False))
    compiled_model = _model(compile=True)
    compiled = _stream_outputs(compiled_model)
    for step, (a, b) in enumerate(zip(eager, compiled)):
        for name in ("depth", "world_points", "pose_enc", "depth_conf"):
            assert _relative(b[name], a[name]) < 2e-2, (step, name, _relative(b[name], a[name]))
    stats = compiled_model.compiled_parts.stats
    assert stats.signatures > 0 and stats.eager_calls == 0


@needs_cuda
def test_graphed_compiled_stream_equals_compiled():
    # CUDA graphs over the compiled parts replay the same kernels: equal to compiled alone.
    compiled = _stream_outputs(_model(compile=True))
    model = _model(compile=True, cuda_graphs=True)
    graphed = _stream_outputs(model)
    for step, (a, b) in enumerate(zip(compiled, graphed)):
        for name in ("depth", "world_points", "pose_enc", "depth_conf"):
            assert _relative(b[name], a[name]) < 1e-3, (step, name, _relative(b[name], a[name]))
    graphs = model.cuda_graph_stats
    assert graphs.captured > 0 and graphs.replays > 0 and not graphs.failed
    assert model.compiled_parts.stats.eager_calls == 0


@needs_cuda
def test_runtime_warmup_compiles_buckets_then_steps_without_compiling():
    model = _model(compile=True)
    runtime = TorchRuntime(model, CACHE, max_batch_streams=2)
    report = runtime.warmup(HW)
    assert report["compiled_buckets"] == [1, 2] and set(report["compile_seconds"]) == {"1", "2"}
    stats = model.compiled_parts.stats
    signatures = stats.signatures
    streams = [runtime.open_stream() for _ in range(3)]
    for f in _frames(2, streams[0].chunk_size):
        runtime.step(streams, [s.validate(f) for s in streams])
    assert stats.signatures == signatures and stats.eager_calls == 0


@needs_fp8
def test_compiled_fp8_stream_close_to_bf16():
    test_fp8_stream_close_to_bf16(compiled=True)
