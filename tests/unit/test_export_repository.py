"""model_repository_onnx/ (the exported step on Triton's onnxruntime / tensorrt backends with
implicit state) cannot run here - the bundled tritonserver has only the Python backend - so its
configs are validated: rendered = checked in, Triton's own proto parses them, the states match the
layout, initial-state files hold the empty values, the documented copy cost is the real one. Also
the TensorRT repository hook's config editing (pure Python)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from stac_backend.export.trt_repository import read_parameters, set_parameters
from stac_backend.export.triton_variant import (
    PRODUCTION_LAYOUT, VARIANTS, copy_cost_bytes, initial_state_files, render_variant_config,
)

ROOT = Path(__file__).resolve().parents[2]
REPO = ROOT / "model_repository_onnx"
NP = {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32, "TYPE_BOOL": np.bool_}


def parse(text: str):
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient not installed (serving extra)")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_checked_in_configs_are_rendered_and_complete():
    for settings in VARIANTS:
        text = (REPO / settings.name / "config.pbtxt").read_text()
        assert text == render_variant_config(PRODUCTION_LAYOUT, settings), f"{settings.name}: re-render (export/build_onnx_repository.py)"
        for name, data in initial_state_files(PRODUCTION_LAYOUT).items():
            assert (REPO / settings.name / "initial_state" / name).read_bytes() == data


@pytest.mark.parametrize("settings", VARIANTS, ids=[v.name for v in VARIANTS])
def test_config_states_match_the_layout(settings):
    cfg = parse((REPO / settings.name / "config.pbtxt").read_text())
    assert cfg.name == settings.name and cfg.platform == settings.platform and cfg.max_batch_size >= 1
    assert [i.name for i in cfg.input] == ["images", "frame_offset"]
    assert list(cfg.input[1].reshape.shape) == [] and list(cfg.input[1].dims) == [1]
    assert [o.name for o in cfg.output] == ["depth", "depth_conf", "world_points", "world_points_conf", "pose_enc",
                                            "extrinsics", "intrinsics"]
    seq = cfg.sequence_batching
    assert seq.max_sequence_idle_microseconds > 1_000_000 and seq.HasField("oldest")
    layout = {s.name: s for s in PRODUCTION_LAYOUT.state()}
    states = list(seq.state)
    assert sorted(s.input_name[3:] for s in states) == sorted(layout)
    # Triton pairs state inputs and outputs by sorted index: both lists must sort alike
    assert [s.input_name[3:] for s in sorted(states, key=lambda s: s.input_name)] == \
        [s.output_name[4:] for s in sorted(states, key=lambda s: s.output_name)]
    from tritonclient.grpc import model_config_pb2

    for st in states:
        spec = layout[st.input_name[3:]]
        assert st.output_name == "out_" + spec.name
        assert tuple(st.dims) == spec.shape, spec.name
        dtype = model_config_pb2.DataType.Name(st.data_type)
        assert NP[dtype] == np.dtype({"torch.float32": np.float32, "torch.int64": np.int64, "torch.int32": np.int32,
                                      "torch.bool": np.bool_}[str(spec.dtype)])
        init = st.initial_state[0]
        assert tuple(init.dims) == spec.shape and init.data_type == st.data_type
        if spec.fill == 0:
            assert init.zero_data
        else:
            data = np.fromfile(REPO / settings.name / "initial_state" / init.data_file, dtype=NP[dtype])
            assert data.size == int(np.prod(spec.shape)) and np.all(data == spec.fill)


def test_documented_copy_cost_is_the_real_one():
    cost = copy_cost_bytes(PRODUCTION_LAYOUT)
    assert cost == 2 * PRODUCTION_LAYOUT.state_bytes() == 2 * 1_639_448_648
    readme = (REPO / "README.md").read_text()
    assert "1,639,448,648 bytes" in readme and "3.05 GiB" in readme
    for settings in VARIANTS:
        assert f"{cost} bytes" in (REPO / settings.name / "config.pbtxt").read_text()
    assert "3.05 GiB" in (ROOT / "docs" / "export.md").read_text()


def test_policies_with_stac_nodes_are_refused():
    from stac_backend.cache import CacheConfig
    from stac_backend.export.layout import StepLayout

    layout = StepLayout(PRODUCTION_LAYOUT.model, CacheConfig(policy="stac"), 392, 518)
    with pytest.raises(ValueError, match="full"):
        render_variant_config(layout, VARIANTS[0])


def test_tensorrt_hook_switches_the_model_to_the_engine():
    text = (ROOT / "model_repository" / "stac" / "config.pbtxt").read_text()
    params = read_parameters(text)
    assert params["PRESET"] == "vggt-1b" and params["CACHE_CONFIG"] == '{"policy": "stac"}'
    edited = set_parameters(text, {"RUNTIME": "tensorrt", "TRT_PLAN": "tensorrt/step.plan", "DTYPE": "float32"})
    new = read_parameters(edited)
    assert new["RUNTIME"] == "tensorrt" and new["TRT_PLAN"] == "tensorrt/step.plan" and new["DTYPE"] == "float32"
    assert {k: v for k, v in new.items() if k not in ("RUNTIME", "TRT_PLAN", "DTYPE")} == \
        {k: v for k, v in params.items() if k != "DTYPE"}
    parse(edited)  # still a valid model config
