"""Engines built for real from the exported tiny graphs, with whichever TensorRT package is installed
(CI: TensorRT-RTX, which builds without a GPU), and the Triton configurations that serve them.

Checked: every ``stac`` node of the full / heavy_hitter / stac graphs became a plugin layer of its op
with the node's attributes; the engine's I/O names, dtypes and shapes are the layout's; the
optimisation profile spans batch 1..max_batch and chunk 1..cache.chunk with every budget fixed; the
plan is serialised; a wrongly shaped state input and an unknown attribute are refused with clear
errors; the Python-backend model switched to RUNTIME=tensorrt and the stock tensorrt_plan variant
are valid Triton configs that match the built engine's real I/O. Executing an engine needs a GPU
the package supports (none here: TensorRT-RTX refuses compute capability 9.0).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from stac_backend.graph.tensorrt import available

if not available() or importlib.util.find_spec("onnx") is None:
    pytest.skip("needs a TensorRT package and onnx (pip install '.[export,tensorrt]')", allow_module_level=True)

import onnx  # noqa: E402
from onnx import helper  # noqa: E402

from stac_backend.engine.runtimes.tensorrt_runtime import check_plan, read_plan_meta  # noqa: E402
from stac_backend.export.trt_build import EngineBuildError, build_engine  # noqa: E402
from stac_backend.graph.io import input_names, output_names, read_layout  # noqa: E402
from stac_backend.graph.layout import dtype_name  # noqa: E402

from conftest import make_tiny_model  # noqa: E402
from exported_graphs import MODEL_SEED, export_graphs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ("full", "heavy_hitter", "stac")
MAX_BATCH = 2


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, request) -> dict[str, Path]:
    return export_graphs(POLICIES + ("full_standard",), make_tiny_model(seed=MODEL_SEED),
                         tmp_path_factory.mktemp("trt-onnx"), request)


@pytest.fixture(scope="module")
def engines(graphs, tmp_path_factory, request) -> dict[str, Path]:
    """One engine per graph, cached in pytest's cache by graph, build code and TensorRT version."""
    from stac_backend.graph.tensorrt import load, version

    cache = getattr(request.config, "cache", None)
    folder = Path(cache.mkdir("stac-trt-build")) if cache is not None else tmp_path_factory.mktemp("trt-plans")
    h = hashlib.sha256(version(load()).encode())
    for path in ("export/trt_build.py", "graph/trt_plugins.py", "graph/op_specs.py"):
        h.update((ROOT / "stac_backend" / path).read_bytes())
    plans = {}
    for name in POLICIES + ("full_standard",):
        key = hashlib.sha256(h.digest() + graphs[name].read_bytes()).hexdigest()[:16]
        plans[name] = folder / f"{name}-{key}.plan"
        if not plans[name].exists() or not Path(str(plans[name]) + ".layout.json").exists():
            build_engine(graphs[name], plans[name], max_batch=MAX_BATCH)
    return plans


def _attributes(node) -> dict:
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in values.items()
            if k not in ("plugin_namespace", "plugin_version")}


@pytest.mark.parametrize("policy", POLICIES)
def test_every_stac_node_became_its_plugin(graphs, engines, policy):
    proto = onnx.load(str(graphs[policy]), load_external_data=False)
    nodes = [n for n in proto.graph.node if n.domain == "stac"]
    _, meta = read_plan_meta(engines[policy])
    assert meta["plugin_layers"] == dict(Counter(n.op_type for n in nodes))
    expected = {"full": {"StacAttention"}, "heavy_hitter": {"StacAttention", "StacScoreDecay", "StacTopKKeep"},
                "stac": {"StacAttention", "StacScoreDecay", "StacTopKKeep", "StacVoxelPoolUpdate", "StacRetrieve"}}
    assert set(meta["plugin_layers"]) == expected[policy]
    for op, attrs in meta["plugin_attributes"].items():
        node = next(n for n in nodes if n.op_type == op)
        want = _attributes(node)
        assert set(attrs) == set(want), op
        for key, value in want.items():  # floats went through float32 fields
            assert attrs[key] == (pytest.approx(value) if isinstance(value, float) else value), (op, key)
    assert meta["needs_python"] is True and meta["plugins"] == "python" and meta["aot_ops"] == []
    assert meta["tensorrt"].split()[0] in ("tensorrt", "tensorrt_rtx")
    assert engines[policy].stat().st_size == meta["plan_bytes"] > 0


@pytest.mark.parametrize("policy", POLICIES)
def test_engine_io_and_profile_are_the_layouts(graphs, engines, policy):
    layout = read_layout(graphs[policy])
    _, meta = read_plan_meta(engines[policy])
    io = meta["io"]
    assert [t["name"] for t in io if t["mode"] == "input"] == input_names(layout)
    assert [t["name"] for t in io if t["mode"] == "output"] == output_names(layout)
    by_name = {t["name"]: t for t in io}
    H, W, C = layout.height, layout.width, layout.max_chunk
    assert by_name["images"] == {"name": "images", "mode": "input", "dtype": "float32", "shape": [-1, -1, 3, H, W]}
    assert by_name["frame_offset"]["dtype"] == "int64" and by_name["depth"]["shape"][-2:] == [H, W]
    for s in layout.state():
        for prefix in ("in_", "out_"):
            t = by_name[prefix + s.name]
            assert t["dtype"] == dtype_name(s.dtype), t
            # batch is dynamic; budget axes may be too (fixed by the profile), model axes are fixed
            assert len(t["shape"]) == 1 + len(s.shape) and t["shape"][0] == -1
            assert all(g in (-1, d) for g, d in zip(t["shape"][1:], s.shape)), (t, s.shape)
    profile = meta["profile"]
    assert profile["images"] == [[1, 1, 3, H, W], [1, C, 3, H, W], [MAX_BATCH, C, 3, H, W]]
    assert profile["frame_offset"] == [[1], [1], [MAX_BATCH]]
    for s in layout.state():
        assert profile["in_" + s.name] == [[1, *s.shape], [1, *s.shape], [MAX_BATCH, *s.shape]]
    check_plan(engines[policy])  # what the runtime verifies before it deserializes


def test_a_wrongly_shaped_state_input_is_refused(graphs, tmp_path):
    proto = onnx.load(str(graphs["heavy_hitter"]))
    hot_k = next(i for i in proto.graph.input if i.name == "in_hot_k")
    hot_k.type.tensor_type.shape.dim[4].dim_value += 1  # head dim 16 -> 17
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    with pytest.raises(EngineBuildError, match=r"in_hot_k: dimension 4 is 17, layout says 16"):
        build_engine(tmp_path / "bad.onnx", tmp_path / "bad.plan")
    assert not (tmp_path / "bad.plan").exists()


def test_an_unknown_attribute_is_refused(graphs, tmp_path):
    proto = onnx.load(str(graphs["heavy_hitter"]))
    keep = next(n for n in proto.graph.node if n.op_type == "StacTopKKeep")
    keep.attribute.append(helper.make_attribute("windw", 4))
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    with pytest.raises(EngineBuildError, match=r"StacTopKKeep node '.*': unknown attribute\(s\) \['windw'\]"):
        build_engine(tmp_path / "bad.onnx", tmp_path / "bad.plan")


# ------------------------------------------------------------------ Triton configurations
def _parse_config(text: str):
    pytest.importorskip("tritonclient")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig()), model_config_pb2


def test_python_backend_model_switched_to_the_engine(engines, tmp_path):
    """The repository build's last step on a rendered repository: RUNTIME=tensorrt + TRT_PLAN, a
    valid config, and a plan whose recorded I/O the runtime accepts."""
    pytest.importorskip("tritonclient")
    from stac_backend.export.trt_repository import read_parameters, set_parameters
    from stac_backend.serving.repository import ServeSettings, write_repository

    repo = write_repository(tmp_path / "repo", ServeSettings(preset="tiny", device="cpu", instance_kind="KIND_CPU"))
    model_dir = repo / "stac"
    (model_dir / "tensorrt").mkdir()
    for suffix in ("", ".layout.json"):
        shutil.copy2(str(engines["stac"]) + suffix, str(model_dir / "tensorrt" / "step.plan") + suffix)
    config = model_dir / "config.pbtxt"
    config.write_text(set_parameters(config.read_text(), {"RUNTIME": "tensorrt", "TRT_PLAN": "tensorrt/step.plan"}))
    parsed, _ = _parse_config(config.read_text())
    params = {k: v.string_value for k, v in parsed.parameters.items()}
    assert params["RUNTIME"] == "tensorrt" and params["TRT_PLAN"] == "tensorrt/step.plan"
    assert read_parameters(config.read_text()) == params
    layout, meta = check_plan(model_dir / params["TRT_PLAN"])
    assert layout.policy == "stac" and meta["needs_python"]  # hence the Python backend, not tensorrt_plan
    assert parsed.backend == "python"


def test_stock_tensorrt_variant_matches_the_engine(graphs, engines):
    """The tensorrt_plan variant (Triton's C++ backend, implicit state) against the engine built from
    the graph without stac nodes: every config input, output and state is an engine tensor of that
    name, dtype and shape (batch first), and the engine needs no plugin."""
    from stac_backend.export.triton_variant import VariantSettings, render_variant_config

    layout = read_layout(graphs["full_standard"])
    _, meta = read_plan_meta(engines["full_standard"])
    assert meta["plugin_layers"] == {} and meta["needs_python"] is False
    cfg, pb = _parse_config(render_variant_config(layout, VariantSettings("stac_full_trt", "tensorrt_plan",
                                                                          max_batch_size=MAX_BATCH)))
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == MAX_BATCH
    types = {"TYPE_FP32": "float32", "TYPE_INT64": "int64", "TYPE_INT32": "int32", "TYPE_BOOL": "bool"}
    tensors = {t["name"]: t for t in meta["io"]}

    def check(name, mode, data_type, dims):
        t = tensors[name]
        assert t["mode"] == mode and t["dtype"] == types[pb.DataType.Name(data_type)], (name, t)
        assert len(t["shape"]) == 1 + len(dims) and t["shape"][0] == -1, (name, t["shape"], list(dims))
        assert all(e in (-1, d) or d == -1 for e, d in zip(t["shape"][1:], dims)), (name, t["shape"], list(dims))

    for i in cfg.input:
        check(i.name, "input", i.data_type, i.reshape.shape if i.HasField("reshape") else i.dims)
    for o in cfg.output:
        check(o.name, "output", o.data_type, o.dims)
    for st in cfg.sequence_batching.state:
        check(st.input_name, "input", st.data_type, st.dims)
        check(st.output_name, "output", st.data_type, st.dims)
    configured = {i.name for i in cfg.input} | {st.input_name for st in cfg.sequence_batching.state}
    assert configured == {t["name"] for t in meta["io"] if t["mode"] == "input"}
    assert max(meta["profile"]["images"][2][0], 0) == MAX_BATCH
    assert json.loads(json.dumps(meta["layout"]))["cache"]["policy"] == "full"


def test_tensorrt_runtime_parameters_are_checked_before_the_engine_loads(engines, tmp_path):
    """make_runtime("tensorrt", ...) as the Triton model calls it: a missing plan or a CACHE_CONFIG
    other than the engine's is refused with a clear message before any GPU is needed."""
    from stac_backend.engine.runtime import make_runtime

    shutil.copy2(engines["stac"], tmp_path / "step.plan")
    shutil.copy2(str(engines["stac"]) + ".layout.json", tmp_path / "step.plan.layout.json")
    with pytest.raises(ValueError, match="needs the TRT_PLAN parameter"):
        make_runtime("tensorrt", params={}, model_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not found"):
        make_runtime("tensorrt", params={"TRT_PLAN": "absent.plan"}, model_dir=str(tmp_path))
    with pytest.raises(ValueError, match="differs from the cache configuration"):
        make_runtime("tensorrt", params={"TRT_PLAN": "step.plan", "CACHE_CONFIG": '{"policy": "full"}'},
                     model_dir=str(tmp_path))
