"""The stac ops as TensorRT IPluginV3 plugins (``stac_backend.graph.trt_plugins``).

Without TensorRT: the shape rules against the torch ops' own output shapes, their refusals, the
attribute parsing. With either TensorRT package (``tensorrt_rtx`` installs on CPU machines): the
creators in the registry, serialisation round trips, format support, and a one-node graph whose
inputs disagree refused at parse time with the plugin's message. With datacenter ``tensorrt`` and
a GPU it could supported: a 20-frame stream through the engine against the torch engine.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from stac_backend.graph import ops  # noqa: F401 - registers torch.ops.stac.*
from stac_backend.graph.op_specs import SPECS
from stac_backend.graph.ops import PLUGIN_NAMES
from stac_backend.graph.tensorrt import available
from stac_backend.graph.trt_plugins import PluginConfigError, check_input_dims, output_dims, parse_fields

needs_tensorrt = pytest.mark.skipif(not available(), reason="no TensorRT package (pip install '.[tensorrt]')")
DTYPES = {"F": torch.float32, "I32": torch.int32, "I64": torch.int64, "B": torch.bool}
B, L, Hh, Ns, T, M, D, V = 2, 3, 4, 11, 5, 7, 16, 6
SHAPES = {
    "q": (B, Hh, M, D), "k": (B, Hh, Ns + T + M, D), "v": (B, Hh, Ns + T + M, D), "key_bias": (B, Hh, Ns + T + M),
    "key_valid": (B, Hh, Ns + T + M), "hot_score": (B, L, Hh, Ns), "hot_len": (B, L), "mass": (B, L, Hh, Ns + T + M),
    "ret_valid": (B, L, Hh, T), "hot_k": (B, L, Hh, Ns, D), "hot_v": (B, L, Hh, Ns, D), "hot_frame": (B, L, Hh, Ns),
    "hot_index": (B, L, Hh, Ns), "hot_pos": (B, L, Hh, Ns, 3), "new_k": (B, L, Hh, M, D), "new_v": (B, L, Hh, M, D),
    "score": (B, L, Hh, Ns + M), "world_points": (B, 1, 14, 14, 3), "world_points_conf": (B, 1, 14, 14),
    "frame_offset": (B,), "piv_k": (B, L, Hh, V, 4, D), "piv_v": (B, L, Hh, V, 4, D), "piv_w": (B, L, Hh, V, 4),
    "piv_s": (B, L, Hh, V, 4), "piv_c": (B, L, Hh, V, 4), "buf_k": (B, L, Hh, V, 8, D), "buf_v": (B, L, Hh, V, 8, D),
    "buf_s": (B, L, Hh, V, 8), "buf_n": (B, L, Hh, V), "car_k": (B, L, Hh, V, 3, D), "car_v": (B, L, Hh, V, 3, D),
    "car_s": (B, L, Hh, V, 3), "car_n": (B, L, Hh, V), "row_key": (B, V), "row_last_used": (B, V),
    "ev_k": (B, L, Hh, M, D), "ev_v": (B, L, Hh, M, D), "ev_score": (B, L, Hh, M), "ev_pos": (B, L, Hh, M, 3),
    "ev_len": (B, L), "steps": (B, 1), "ret_k": (B, L, Hh, T, D), "ret_v": (B, L, Hh, T, D),
    "ret_bias": (B, L, Hh, T), "latest_frame": (B,),
}


def _attr_values(op_type):
    return {name: ([0] if kind == "INTS" else 1) for name, kind, _ in SPECS[op_type][3]}


@pytest.mark.parametrize("op_type", list(SPECS))
def test_shape_rules_equal_the_torch_ops_output_shapes(op_type):
    """What TensorRT gets from get_output_shapes is what the torch op (that the graph was traced
    from) produces, for every output; the inputs pass the plugin's consistency checks."""
    torch_name = next(k for k, v in PLUGIN_NAMES.items() if v == op_type)
    _, inputs, outputs, _ = SPECS[op_type]
    dims = [SHAPES[name] for name, _ in inputs]
    check_input_dims(op_type, dims)
    shapes = output_dims(op_type, dims, lambda a, b: a - b)
    with FakeTensorMode():
        fakes = getattr(torch.ops.stac, torch_name)(*[torch.empty(SHAPES[n], dtype=DTYPES[t]) for n, t in inputs],
                                                     *_attr_values(op_type).values())
    fakes = fakes if isinstance(fakes, (tuple, list)) else (fakes,)
    assert len(shapes) == len(outputs) == len(fakes)
    for (name, code), shape, fake in zip(outputs, shapes, fakes):
        assert tuple(shape) == tuple(fake.shape), f"{op_type}.{name}"
        assert DTYPES[code] == fake.dtype, f"{op_type}.{name}"


@pytest.mark.parametrize("op_type,name,axis,match", [
    ("StacAttention", "k", 3, "head dim dimension differs.*q\\[3\\]=16.*k\\[3\\]=17"),
    ("StacScoreDecay", "hot_len", 1, "layers dimension differs"),
    ("StacTopKKeep", "hot_score", None, "rank"),
    ("StacTopKKeep", "hot_pos", 4, "hot_pos must have 3 at axis 4"),
    ("StacVoxelPoolUpdate", "row_key", 1, "voxels dimension differs"),
    ("StacRetrieve", "ret_bias", 3, "retrieved budget dimension differs"),
])
def test_wrongly_shaped_inputs_are_refused(op_type, name, axis, match):
    dims = {n: list(SHAPES[n]) for n, _ in SPECS[op_type][1]}
    if name == "hot_score" and op_type == "StacTopKKeep":  # score is an input here, hot_score is not
        name = "score"
    if axis is None:
        dims[name] = dims[name][:-1]
    else:
        dims[name][axis] += 1
    with pytest.raises(PluginConfigError, match=match):
        check_input_dims(op_type, [dims[n] for n, _ in SPECS[op_type][1]], "node_7")
    # an unknown dimension (dynamic until the profile fixes it) is never a reason to refuse
    unknown = [[None] * len(SHAPES[n]) for n, _ in SPECS[op_type][1]]
    check_input_dims(op_type, unknown)


def test_attributes_are_parsed_and_unknown_ones_refused():
    import numpy as np

    fields = {"window": np.array([4], np.int32), "hh": np.array([2], np.int32), "pinned_frames": np.array([0, 3], np.int32),
              "patch_size": np.array([14], np.int32), "patch_start_idx": np.array([5], np.int32),
              "conf_threshold": np.array([2.0], np.float32), "track_positions": np.array([1], np.int32)}
    attrs = parse_fields("StacTopKKeep", "keep", fields)
    assert attrs["pinned_frames"] == [0, 3] and attrs["window"] == 4 and attrs["conf_threshold"] == 2.0
    with pytest.raises(PluginConfigError, match=r"StacTopKKeep node 'keep': unknown attribute\(s\) \['windw'\]"):
        parse_fields("StacTopKKeep", "keep", {**fields, "windw": np.array([4], np.int32)})
    with pytest.raises(PluginConfigError, match=r"missing attribute\(s\) \['hh'\]"):
        parse_fields("StacTopKKeep", "keep", {k: v for k, v in fields.items() if k != "hh"})
    with pytest.raises(PluginConfigError, match="aot"):
        parse_fields("StacScoreDecay", "decay", {"gamma": np.array([0.9], np.float32), "aot": np.array([1], np.int32)})


# ------------------------------------------------------------------ with a TensorRT package
@needs_tensorrt
def test_creators_registered_and_plugins_survive_serialisation():
    import numpy as np

    from stac_backend.graph.tensorrt import load
    from stac_backend.graph.trt_plugins import PLUGIN_IDS, register

    trt = load()
    creators = register(trt)
    assert register(trt) is creators  # idempotent
    registry = trt.get_plugin_registry()
    for op_type, plugin_id in PLUGIN_IDS.items():
        creator = registry.get_creator(op_type, "1", "stac")
        assert creator is not None and creator.name == op_type and plugin_id == f"stac::{op_type}"
        declared = [(f.name) for f in creator.field_names]
        assert declared == [name for name, _, _ in SPECS[op_type][3]]
    creator = registry.get_creator("StacTopKKeep", "1", "stac")
    values = {name: np.array(value, np.float32 if name == "conf_threshold" else np.int32)  # outlive the fields
              for name, value in (("window", [4]), ("hh", [2]), ("pinned_frames", [0, 9]), ("patch_size", [14]),
                                  ("patch_start_idx", [5]), ("conf_threshold", [1.5]), ("track_positions", [1]))}
    fields = trt.PluginFieldCollection([
        trt.PluginField(name, data, trt.PluginFieldType.FLOAT32 if name == "conf_threshold" else trt.PluginFieldType.INT32)
        for name, data in values.items()])
    plugin = creator.create_plugin("keep", fields, trt.TensorRTPhase.BUILD)
    assert plugin.num_outputs == 12 and plugin.plugin_namespace == "stac" and plugin.plugin_version == "1"
    restored = creator.create_plugin("keep", plugin.get_fields_to_serialize(), trt.TensorRTPhase.RUNTIME)
    assert restored.attrs == plugin.attrs == {"window": 4, "hh": 2, "pinned_frames": [0, 9], "patch_size": 14,
                                              "patch_start_idx": 5, "conf_threshold": 1.5, "track_positions": 1}
    assert plugin.clone().attrs == plugin.attrs
    assert [str(t) for t in plugin.get_output_data_types([])] == [
        str({"F": trt.float32, "I32": trt.int32, "I64": trt.int64}[code]) for _, code in SPECS["StacTopKKeep"][2]]


@needs_tensorrt
def test_format_support_is_linear_and_the_schema_dtype_at_every_position():
    import numpy as np

    from stac_backend.graph.tensorrt import load
    from stac_backend.graph.trt_plugins import register

    trt = load()
    register(trt)
    gamma = np.array([0.9], np.float32)
    creator = trt.get_plugin_registry().get_creator("StacScoreDecay", "1", "stac")
    plugin = creator.create_plugin("decay", trt.PluginFieldCollection(
        [trt.PluginField("gamma", gamma, trt.PluginFieldType.FLOAT32)]), trt.TensorRTPhase.BUILD)
    codes = [code for _, code in SPECS["StacScoreDecay"][1] + SPECS["StacScoreDecay"][2]]  # F, I64, F, B | F
    types = {"F": trt.float32, "I64": trt.int64, "B": trt.bool}

    def descs(dtype_at, fmt=trt.TensorFormat.LINEAR):
        out = []
        for pos, code in enumerate(codes):
            d, t = trt.DynamicPluginTensorDesc(), trt.PluginTensorDesc()
            t.type, t.format = dtype_at.get(pos, types[code]), fmt
            d.desc = t
            out.append(d)
        return out

    for pos in range(len(codes)):
        assert plugin.supports_format_combination(pos, descs({}), 4)
        wrong = trt.int32 if codes[pos] != "I32" else trt.float32
        assert not plugin.supports_format_combination(pos, descs({pos: wrong}), 4)
    assert not plugin.supports_format_combination(0, descs({}, trt.TensorFormat.CHW32), 4)


def _one_node_graph(path, layers_of_hot_len: int):
    import onnx
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info("hot_score", TensorProto.FLOAT, ["B", 2, 2, 5]),
              helper.make_tensor_value_info("hot_len", TensorProto.INT64, ["B", layers_of_hot_len]),
              helper.make_tensor_value_info("mass", TensorProto.FLOAT, ["B", 2, 2, 11]),
              helper.make_tensor_value_info("ret_valid", TensorProto.BOOL, ["B", 2, 2, 3])]
    node = helper.make_node("StacScoreDecay", [i.name for i in inputs], ["score"], domain="stac", name="decay",
                            gamma=0.9, plugin_namespace="stac", plugin_version="1")
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("score", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("stac", 1)]), path)
    return path


@needs_tensorrt
def test_parser_resolves_a_stac_node_and_the_plugin_refuses_bad_shapes(tmp_path):
    pytest.importorskip("onnx")
    from stac_backend.export.trt_build import EngineBuildError, parse_network, plugin_layers
    from stac_backend.graph.tensorrt import load

    trt = load()
    _, network, _, _ = parse_network(_one_node_graph(tmp_path / "ok.onnx", 2), trt)
    layers = plugin_layers(network, trt)
    assert [(e["op"], e["namespace"], e["attributes"]["gamma"]) for e in layers] == [("StacScoreDecay", "stac",
                                                                                       pytest.approx(0.9))]
    assert list(network.get_output(0).shape) == [-1, 2, 2, 8]  # [B, L, H, Ns + M] = 11 - 3 retrieved
    with pytest.raises(EngineBuildError, match=r"StacScoreDecay node 'decay': the layers dimension differs"):
        parse_network(_one_node_graph(tmp_path / "bad.onnx", 3), trt)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="executing an engine needs a GPU the package supports")
def test_engine_stream_matches_torch_engine(tmp_path):
    """Where an engine can execute (datacenter tensorrt on a datacenter GPU; TensorRT-RTX refuses
    compute capability 9.0): 20 frames through the stac engine equal the torch engine."""
    if not available():
        pytest.skip("no TensorRT package")
    from stac_backend.cache import CacheConfig
    from stac_backend.engine import Stream
    from stac_backend.engine.runtimes.tensorrt_runtime import TensorRTStream
    from stac_backend.export.onnx_export import export_step
    from stac_backend.export.trt_build import build_engine

    from conftest import make_tiny_model

    # the stac defaults: retrieval before pruning, carried-over pool tokens
    cache = CacheConfig(policy="stac", retrieval_start_frame=8, voxel_size=0.01, conf_threshold=0.0, max_voxels=64)
    model = make_tiny_model(seed=11)
    onnx_path = export_step(model, cache, tmp_path / "step.onnx", height=56, width=84, optimize=False)
    plan = build_engine(onnx_path, tmp_path / "step.plan", max_batch=2)
    try:
        stream = TensorRTStream(plan)
    except RuntimeError as error:
        pytest.skip(f"this GPU cannot run the engine: {error}")
    reference = Stream(model.cuda(), cache=cache)
    frames = torch.rand(20, 3, 56, 84, generator=torch.Generator().manual_seed(5))
    for i in range(0, 20, 4):
        got, want = stream.push(frames[i : i + 4]), reference.push(frames[i : i + 4])
        for key in ("depth", "world_points", "pose_enc", "extrinsics"):
            diff = (got[key].float().cpu() - want[key].float().cpu()).abs().max().item()
            assert diff <= 1e-4, f"step {i // 4} {key} differs by {diff}"
