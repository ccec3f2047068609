"""The compiled step (model/compiled.py) against the eager one, and its buckets under the runtime.

The whole-model tests compile with the "aot_eager" backend (outputs: Dynamo and AOT autograd trace
the same graphs Inductor gets) or "eager" (buckets: Dynamo's graphs, guards and recompiles are the
same whatever backend) instead of generating C++, which keeps each test short on a 2-core CPU. One
test runs Inductor itself on a single block (skipped without a C++ compiler).
"""

from __future__ import annotations

import pytest
import torch

from stac_backend.cache import CacheConfig
from stac_backend.engine.stream import Stream
from stac_backend.engine.torch_runtime import TorchRuntime
from stac_backend.model import build_model
from stac_backend.model.compiled import compile_static_parts, compiler_available
from stac_backend.model.config import config_with, get_preset

FAST_BACKEND = "aot_eager"
# Dynamo alone (graphs, guards, recompiles) for the tests of buckets and counters.
TRACE_BACKEND = "eager"
# Stac with its pool filling from the first step: eviction, insert, retrieval all run in 4 steps.
FILLING = CacheConfig(policy="stac", chunk=2, window=2, hh=2, conf_threshold=0.0, retrieval_start_frame=0, retrieval_every=1)


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _frames(steps: int, chunk: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (steps, chunk, 3, 112, 112), dtype=torch.uint8, generator=g)


def _cache_tensors(stream: Stream) -> dict[str, torch.Tensor]:
    return stream.export_state()


def test_compiled_stream_equals_eager_with_eviction_pool_and_retrieval():
    eager = build_model("tiny", seed=0)
    compiled = build_model("tiny", seed=0)
    parts = compile_static_parts(compiled, backend=FAST_BACKEND)
    a, b = Stream(eager, cache=FILLING), Stream(compiled, cache=FILLING)
    frames = _frames(4, a.chunk_size)
    for step in frames:
        out_a, out_b = a.push(step), b.push(step)
        assert out_a.keys() == out_b.keys()
        for name, value in out_a.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                torch.testing.assert_close(out_b[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert parts.stats.signatures > 0 and parts.stats.compiled_calls > 0 and parts.stats.eager_calls == 0
    # The caches hold the same tokens, positions and pool (compiled q/k/v are what the cache stores).
    assert a.memory_bytes() == b.memory_bytes()
    sa, sb = _cache_tensors(a), _cache_tensors(b)
    assert sa.keys() == sb.keys() and len(sa) > 0
    for name, x in sa.items():
        if x.is_floating_point():
            torch.testing.assert_close(sb[name], x, rtol=1e-4, atol=1e-5, equal_nan=True, msg=name)
        else:
            assert torch.equal(sb[name], x), name


def test_blocks_of_one_shape_share_one_graph():
    model = build_model("tiny", seed=0)
    parts = compile_static_parts(model, backend=TRACE_BACKEND)
    Stream(model, cache=FILLING).push(_frames(1, 2)[0])
    dense = [s for s in parts.stats.shapes if s.startswith("dense_block")]
    assert len(dense) == 1  # 4 frame blocks, one compiled signature
    assert compile_static_parts(model) is parts


def test_runtime_warmup_compiles_every_bucket_and_nothing_afterwards():
    model = build_model("tiny", seed=0)
    # A window cache: the buckets do not depend on the policy, and it warms up in fewer steps than stac.
    runtime = TorchRuntime(model, CacheConfig(policy="window", chunk=2, window=2, hh=0, pinned_frames=()),
                           max_batch_streams=3, compile=False)
    compile_static_parts(model, backend=TRACE_BACKEND)
    report = runtime.warmup((112, 112))  # measures 1 and 3 streams per step; 2 is compiled in between
    assert set(report["compile_seconds"]) == {"1", "2", "3"} and report["compiled_buckets"] == [1, 2, 3]
    stats = model.compiled_parts.stats
    signatures, eager = stats.signatures, stats.eager_calls
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    streams = [runtime.open_stream() for _ in range(5)]  # micro-batches of 3 and 2
    frames = _frames(2, streams[0].chunk_size)
    for step in frames:
        runtime.step(streams, [s.validate(step) for s in streams])
    assert stats.signatures == signatures  # no new bucket compiled after the warm-up
    assert counters["stats"]["unique_graphs"] == graphs
    assert stats.eager_calls == eager  # and none ran eagerly: every bucket was warmed up
    # A shape never warmed up (another frame size) runs eagerly instead of compiling mid-request.
    other = runtime.open_stream()
    runtime.step([other], [other.validate(_frames(1, other.chunk_size)[0][..., :98, :98])])
    assert stats.signatures == signatures and stats.eager_calls > eager


def test_compiling_a_graphed_model_is_refused():
    # Graphs capture the forward they wrap: compiling afterwards would bypass them.
    model = build_model("tiny", seed=0)
    model.cuda_graph_stats = object()
    with pytest.raises(ValueError, match="compile it before giving it graphs"):
        compile_static_parts(model, backend=TRACE_BACKEND)


@pytest.mark.skipif(compiler_available("cpu") is not None, reason="Inductor needs a C++ compiler on the CPU")
def test_inductor_block_equals_eager():
    config = config_with(get_preset("tiny"), depth=1, dpt_intermediate_layer_idx=(0, 0, 0, 0))
    model = build_model(config, seed=0)
    block = model.aggregator.frame_blocks[0]
    x = torch.randn(2, 21, config.embed_dim)
    pos = torch.randint(0, 5, (2, 21, 2))
    with torch.inference_mode():
        expected = block(x, pos=pos)
        compile_static_parts(model)
        got = block(x, pos=pos)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert model.compiled_parts.stats.signatures == 1


def test_serving_settings_carry_the_compile_and_fp8_switches():
    from stac_backend.serving.settings import ServeSettings, settings_from_config, to_parameters

    assert "COMPILE" not in to_parameters(ServeSettings()) and "FP8" not in to_parameters(ServeSettings())
    params = to_parameters(ServeSettings(compile=True, fp8=True))
    assert params["COMPILE"] == "1" and params["FP8"] == "1"
    back = settings_from_config({"parameters": {k: {"string_value": v} for k, v in params.items()}})
    assert back.compile and back.fp8
    assert settings_from_config({"parameters": {}}).compile is None  # auto
    assert settings_from_config({"parameters": {"COMPILE": {"string_value": "0"}}}).compile is False
    assert to_parameters(ServeSettings(compile=False))["COMPILE"] == "0"
    with pytest.raises(ValueError, match="COMPILE must be auto, 0 or 1"):
        settings_from_config({"parameters": {"COMPILE": {"string_value": "maybe"}}})


def test_compile_auto_is_on_for_cuda_instances_that_warm_up(monkeypatch):
    from stac_backend.serving.triton_model import compile_choice

    monkeypatch.delenv("STAC_COMPILE", raising=False)
    assert compile_choice(None, "cuda:0", {"parameters": {}}, "KIND_GPU") is True
    assert compile_choice(None, "cuda:0", {"parameters": {"WARMUP": {"string_value": "off"}}}, "KIND_GPU") is False
    assert compile_choice(None, "cpu", {"parameters": {}}, "KIND_CPU") is False
    assert compile_choice(False, "cuda:0", {"parameters": {}}, "KIND_GPU") is False
    monkeypatch.setenv("STAC_COMPILE", "0")
    assert compile_choice(None, "cuda:0", {"parameters": {}}, "KIND_GPU") is None  # the environment decides


def test_serving_settings_carry_the_cuda_graphs_switch():
    from stac_backend.serving.settings import ServeSettings, settings_from_config, to_parameters

    assert "CUDA_GRAPHS" not in to_parameters(ServeSettings())  # auto
    for value, text in ((True, "1"), (False, "0")):
        params = to_parameters(ServeSettings(cuda_graphs=value))
        assert params["CUDA_GRAPHS"] == text
        back = settings_from_config({"parameters": {k: {"string_value": v} for k, v in params.items()}})
        assert back.cuda_graphs is value
    assert settings_from_config({"parameters": {}}).cuda_graphs is None
    with pytest.raises(ValueError, match="CUDA_GRAPHS must be auto, 0 or 1"):
        settings_from_config({"parameters": {"CUDA_GRAPHS": {"string_value": "sometimes"}}})
