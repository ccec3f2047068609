"""The exported step graph (tiny model, 56x84) on ONNX Runtime with the stac custom ops.

Two graphs are exported once per run, in parallel child processes through the command line
(``stac export onnx``, ``tests/exported_graphs.py``), and cached in pytest's cache keyed by the sources and the
weights: ``full`` and ``stac``. Checked here:
- the graph: opset, ``stac``-domain nodes named like the TensorRT plugins, with their attributes
  and plugin_namespace/plugin_version; dynamic batch, chunk and budget axes;
- a 20-frame stream through ONNX Runtime reproduces the torch engine within 1e-4 (full with
  chunks of varying size, stac with real pruning, pooling and retrieval);
- several streams in one batched call equal solo runs; bad input is refused without harm;
- the genuine tritonserver serves the graph with RUNTIME=onnxruntime (Python backend).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxruntime_extensions") is None:
    pytest.skip("export extras not installed (pip install -e '.[export]')", allow_module_level=True)

import onnx  # noqa: E402

from stac_backend.cache import CacheConfig  # noqa: E402
from stac_backend.engine import Stream  # noqa: E402
from stac_backend.engine.runtimes.onnx_runtime import OnnxRuntimeStream, OnnxStep, push_many  # noqa: E402
from stac_backend.graph.io import read_layout  # noqa: E402
from stac_backend.graph.op_specs import SPECS  # noqa: E402
from stac_backend.model import OUTPUT_NAMES  # noqa: E402

from conftest import make_tiny_model  # noqa: E402
from exported_graphs import GRAPHS, H, W, export_graphs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4
COMPARED = [n for n in OUTPUT_NAMES if n != "intrinsics"]  # intrinsics derive from pose_enc (compared)
POLICIES = {name: GRAPHS[name][:2] for name in ("full", "stac")}


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(seed=11)


@pytest.fixture(scope="module")
def graphs(model, tmp_path_factory, request) -> dict[str, Path]:
    """Exported graphs per policy (in parallel, cached across runs by content)."""
    return export_graphs(POLICIES, model, tmp_path_factory.mktemp("onnx"), request)


@pytest.fixture(scope="module")
def frames20():
    return torch.rand(20, 3, H, W, generator=torch.Generator().manual_seed(5))


def stream_outputs(stream, frames, chunks):
    outs, offset = [], 0
    for c in chunks:
        outs.append(stream.push(frames[offset : offset + c]))
        offset += c
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


def worst_differences(got, want) -> dict[str, float]:
    return {name: (got[name] - want[name]).abs().max().item() for name in COMPARED}


# ---------------------------------------------------------------------- the graph
def test_graph_has_stac_plugin_nodes_and_dynamic_axes(graphs, model):
    proto = onnx.load(str(graphs["stac"]))
    opsets = {o.domain: o.version for o in proto.opset_import}
    assert opsets[""] >= 18 and opsets["stac"] == 1
    nodes = [n for n in proto.graph.node if n.domain == "stac"]
    counts = {t: sum(n.op_type == t for n in nodes) for t in SPECS}
    assert counts == {"StacAttention": model.config.depth, "StacScoreDecay": 1, "StacTopKKeep": 1,
                      "StacVoxelPoolUpdate": 1, "StacRetrieve": 1}
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"stac" and attrs["plugin_version"] == b"1"
        declared = {name for name, _, _ in SPECS[node.op_type][3]}
        assert declared <= set(attrs), f"{node.op_type} lacks {declared - set(attrs)}"
        assert len(node.input) == len(SPECS[node.op_type][1]) and len(node.output) == len(SPECS[node.op_type][2])
    keep = next(n for n in nodes if n.op_type == "StacTopKKeep")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in keep.attribute}
    assert attrs["window"] == 4 and attrs["hh"] == 2 and list(attrs["pinned_frames"]) == [0]
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert inputs["images"] == ["batch", "chunk", 3, H, W]
    assert inputs["in_hot_k"][3] == "hot_tokens" and inputs["in_pool_piv_k"][3] == "voxels"
    outputs = [o.name for o in proto.graph.output]
    assert outputs[:7] == ["depth", "depth_conf", "world_points", "world_points_conf", "pose_enc", "extrinsics", "intrinsics"]
    assert [o[4:] for o in outputs[7:]] == [i[3:] for i in list(inputs)[2:]]
    assert read_layout(graphs["stac"]).cache == CacheConfig.from_dict(POLICIES["stac"][0])
    full = onnx.load(str(graphs["full"]))
    assert {n.op_type for n in full.graph.node if n.domain == "stac"} == {"StacAttention"}
    onnx.checker.check_model(proto)  # the stac schemas are registered by stac_backend.graph.onnx_ops


# ---------------------------------------------------------------------- equivalence
def test_full_20_frames_match_torch_engine(graphs, model, frames20):
    chunks = [4, 4, 3, 4, 4, 1]  # the chunk axis is dynamic
    stream = OnnxRuntimeStream(OnnxStep(graphs["full"], threads=1))
    got = stream_outputs(stream, frames20, chunks)
    want = stream_outputs(Stream(model, cache=CacheConfig(policy="full")), frames20, chunks)
    diffs = worst_differences(got, want)
    print("full ORT vs torch:", diffs)
    assert max(diffs.values()) <= TOL, diffs
    assert torch.equal(got["frame_index"], torch.arange(20))
    assert stream.memory_bytes() == stream.layout.state_bytes()
    assert int(stream.state["kv_len"][0, 0]) == 20 * model.config.tokens_per_frame(H, W)


def test_stac_20_frames_match_torch_engine(graphs, model, frames20):
    cache = CacheConfig.from_dict(POLICIES["stac"][0])
    stream = OnnxRuntimeStream(OnnxStep(graphs["stac"], threads=1))
    reference = Stream(model, cache=cache)
    got = stream_outputs(stream, frames20, [4] * 5)
    want = stream_outputs(reference, frames20, [4] * 5)
    diffs = worst_differences(got, want)
    print("stac ORT vs torch:", diffs)
    assert max(diffs.values()) <= TOL, diffs
    # the cache really worked: pruned, pooled and retrieved - and holds what the engine holds
    s, ref = stream.state, reference.cache.stats()
    assert int(s["hot_len"][0, 0]) == ref["tokens_per_head"] < 20 * model.config.tokens_per_frame(H, W)
    assert ref["evicted_tokens"] > 0 and ref["pool_pivots"] > 0
    assert int((s["pool_row_key"] >= 0).sum()) == ref["pool_voxels"] > 0
    assert int((s["pool_piv_c"] > 0).sum()) == ref["pool_pivots"]
    assert int(s["pool_car_n"].sum()) == ref["pool_carried_tokens"] > 0  # carried-over tokens, as in the engine
    assert int(s["ret_valid"].sum(-1).max()) == ref["retrieved_per_head"] > 0


def test_streams_batched_in_one_call_equal_solo_runs(graphs, frames20):
    step = OnnxStep(graphs["stac"], threads=1)
    other = torch.rand(12, 3, H, W, generator=torch.Generator().manual_seed(9))
    solo = [stream_outputs(OnnxRuntimeStream(step), v, [4] * 3) for v in (frames20[:12], other)]
    a, b = OnnxRuntimeStream(step), OnnxRuntimeStream(step)
    a.push(frames20[:4])  # a is one step ahead: per-row frame offsets
    got_a, got_b = [], []
    for i in range(3):
        chunks = [] if i == 2 else [a.validate(frames20[4 * i + 4 : 4 * i + 8])]
        streams = ([a] if chunks else []) + [b]
        chunks.append(b.validate(other[4 * i : 4 * i + 4]))
        outs = push_many(streams, chunks)
        if len(outs) == 2:
            got_a.append(outs[0])
        got_b.append(outs[-1])
    assert np.abs(torch.cat([o["depth"] for o in got_b]).numpy() - solo[1]["depth"].numpy()).max() <= 1e-5
    assert np.abs(torch.cat([o["pose_enc"] for o in got_a]).numpy() - solo[0]["pose_enc"][4:].numpy()).max() <= 1e-5


def test_batches_are_split_at_the_executors_max_batch(graphs, frames20):
    """The one stream adapter (TensorRT uses it too): three streams, max_batch 2 -> two calls, each
    stream's outputs and frame numbering equal its solo run."""
    step = OnnxStep(graphs["stac"], threads=1)
    views = [frames20[:8], frames20[4:12], frames20[8:16]]
    want = [stream_outputs(OnnxRuntimeStream(step), v, [4, 4]) for v in views]
    step.max_batch = 2
    streams = [OnnxRuntimeStream(step) for _ in views]
    got = [[], [], []]
    for c in range(2):
        outs = push_many(streams, [s.validate(v[4 * c : 4 * c + 4]) for s, v in zip(streams, views)])
        for g, out in zip(got, outs):
            g.append(out)
    for g, w in zip(got, want):
        assert torch.equal(torch.cat([o["frame_index"] for o in g]), torch.arange(8))
        assert (torch.cat([o["depth"] for o in g]) - w["depth"]).abs().max() <= 1e-5


def test_bad_input_is_refused_without_touching_the_stream(graphs, frames20):
    stream = OnnxRuntimeStream(OnnxStep(graphs["full"], threads=1))
    stream.push(frames20[:4])
    before = {k: v.clone() for k, v in stream.state.items()}
    with pytest.raises(ValueError, match="56x84"):
        stream.push(torch.rand(2, 3, 42, 84))
    with pytest.raises(ValueError, match="at most 4 frames"):
        stream.push(torch.rand(5, 3, H, W))
    for _ in range(4):
        stream.push(frames20[:4])
    with pytest.raises(ValueError, match="budget exhausted"):  # full: the state holds 20 frames
        stream.push(frames20[:1])
    assert stream.frames_seen == 20
    stream.reset()
    assert stream.memory_bytes() == 0 and stream.push(frames20[:4])["frame_index"].tolist() == [0, 1, 2, 3]
    assert all(torch.equal(before[k], v) or torch.allclose(before[k], v, equal_nan=True) for k, v in stream.state.items())


# ---------------------------------------------------------------------- Triton (Python backend, RUNTIME=onnxruntime)
def test_triton_serves_the_graph_with_onnxruntime(graphs, model, tmp_path):
    if importlib.util.find_spec("pytriton") is None or importlib.util.find_spec("tritonclient") is None:
        pytest.skip("serving extras not installed")
    from stac_backend.client import StacClient
    from stac_backend.serving.repository import ServeSettings, write_repository
    from stac_backend.tools.tritonserver import TritonServer

    layout = read_layout(graphs["stac"])
    settings = ServeSettings(preset="", device="cpu", instance_kind="KIND_CPU", cache_config=layout.cache.to_dict(),
                             runtime="onnxruntime", ort_threads=1, max_queue_delay_us=20000, max_streams=4)
    repo = write_repository(tmp_path / "repo", settings, onnx_file=graphs["stac"])
    config = (repo / "stac" / "config.pbtxt").read_text()
    assert 'key: "RUNTIME" value: { string_value: "onnxruntime" }' in config
    rng = np.random.default_rng(3)
    videos = {31: rng.integers(0, 256, (12, 3, H, W), dtype=np.uint8), 32: rng.integers(0, 256, (8, 3, H, W), dtype=np.uint8)}
    results: dict[int, list] = {sid: [] for sid in videos}
    with TritonServer(repo, log_file=tmp_path / "triton.log", exit_timeout_s=5) as server:

        def run(sid):
            client = StacClient(server.grpc_url)
            try:
                frames = videos[sid]
                for i in range(0, len(frames), 4):
                    results[sid].append(client.send_chunk(sid, frames[i : i + 4], start=i == 0, end=i + 4 >= len(frames)))
            finally:
                client.close()

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(run, videos))
        client = StacClient(server.grpc_url)
        try:
            with pytest.raises(Exception, match="56x84"):
                client.send_chunk(40, np.zeros((1, 3, 42, 84), np.uint8), start=True, end=True)
            assert client.is_ready()
        finally:
            client.close()
    for sid, frames in videos.items():
        reference = Stream(model, cache=layout.cache)
        for i, got in enumerate(results[sid]):
            want = reference.push(frames[4 * i : 4 * i + 4])
            assert got["frame_index"].tolist() == want["frame_index"].tolist()
            assert int(np.asarray(got["cache_bytes"]).reshape(-1)[0]) == layout.state_bytes()
            for key in ("depth", "depth_conf", "world_points", "world_points_conf", "pose_enc", "extrinsics"):
                diff = np.abs(got[key] - want[key].numpy()).max()
                assert diff <= TOL, f"stream {sid} step {i} {key} differs by {diff}"


def test_build_sessions_runtime_parameter(graphs, model, frames20, tmp_path):
    """RUNTIME=onnxruntime swaps the stream implementation behind the same StreamSessions logic."""
    from stac_backend.serving.sessions import FrameRequest, RequestError, StepResult
    from stac_backend.serving.triton_model import build_sessions

    shutil.copy2(graphs["stac"], tmp_path / "step.onnx")
    layout = read_layout(graphs["stac"])

    def config(**params):
        base = {"RUNTIME": "onnxruntime", "ONNX_MODEL": "step.onnx", "ORT_THREADS": "1", "MAX_STREAMS": "2"}
        base.update(params)
        return {"parameters": {k: {"string_value": v} for k, v in base.items()}}

    sessions = build_sessions(config(CACHE_CONFIG=json.dumps(layout.cache.to_dict())), "CPU", 0, str(tmp_path))
    frames = (frames20[:8].numpy() * 255).astype(np.uint8)
    first, = sessions.handle([FrameRequest(corr_id=1, start=True, end=False, frames=frames[:4])])
    second, bad = sessions.handle([FrameRequest(corr_id=1, start=False, end=True, frames=frames[4:8], key=first.stream_key),
                                   FrameRequest(corr_id=2, start=True, end=True, frames=frames[:5])])
    assert isinstance(first, StepResult) and isinstance(second, StepResult)
    assert isinstance(bad, RequestError) and "at most 4 frames" in str(bad)
    assert first.cache_bytes == layout.state_bytes() and sessions.stats()["active_streams"] == 0
    reference = Stream(model, cache=layout.cache)
    for got in (first, second):
        want = reference.push(frames[got.outputs["frame_index"][0] : got.outputs["frame_index"][-1] + 1])
        assert (got.outputs["depth"] - want["depth"]).abs().max() <= TOL
    with pytest.raises(ValueError, match="RUNTIME must be"):
        build_sessions(config(RUNTIME="tensorflow"), "CPU", 0, str(tmp_path))
    with pytest.raises(ValueError, match="ONNX_MODEL"):
        build_sessions(config(ONNX_MODEL=""), "CPU", 0, str(tmp_path))
    with pytest.raises(ValueError, match="differs from the cache configuration"):
        build_sessions(config(CACHE_CONFIG='{"policy": "stac"}'), "CPU", 0, str(tmp_path))


def test_implicit_state_config_matches_the_exported_graph(graphs):
    """model_repository_onnx's renderer, for this graph's layout: every config input, output and
    state is a graph input/output of that name, element type and (fixed) shape."""
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient not installed")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from stac_backend.export.triton_variant import VariantSettings, render_variant_config

    proto = onnx.load(str(graphs["full"]))
    layout = read_layout(proto)
    cfg = text_format.Parse(render_variant_config(layout, VariantSettings("m", "onnxruntime_onnx")),
                            model_config_pb2.ModelConfig())
    onnx_types = {"TYPE_FP32": onnx.TensorProto.FLOAT, "TYPE_INT64": onnx.TensorProto.INT64,
                  "TYPE_INT32": onnx.TensorProto.INT32, "TYPE_BOOL": onnx.TensorProto.BOOL}

    def io(values):
        return {v.name: (v.type.tensor_type.elem_type, [d.dim_value if d.HasField("dim_value") else -1
                                                        for d in v.type.tensor_type.shape.dim]) for v in values}

    inputs, outputs = io(proto.graph.input), io(proto.graph.output)

    def check(table, name, data_type, dims, reshape=None):
        elem, shape = table[name]
        assert onnx_types[model_config_pb2.DataType.Name(data_type)] == elem, name
        want = list(reshape) if reshape is not None else list(dims)
        assert shape[1:] == [d if d > 0 else -1 for d in want] or all(
            a == b or a == -1 for a, b in zip(shape[1:], want)), (name, shape, want)  # [0] is the batch

    for i in cfg.input:
        check(inputs, i.name, i.data_type, i.dims, i.reshape.shape if i.HasField("reshape") else None)
    for o in cfg.output:
        check(outputs, o.name, o.data_type, o.dims)
    for st in cfg.sequence_batching.state:
        check(inputs, st.input_name, st.data_type, st.dims)
        check(outputs, st.output_name, st.data_type, st.dims)
    assert {st.input_name for st in cfg.sequence_batching.state} | {"images", "frame_offset"} == set(inputs)
