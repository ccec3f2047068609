"""render_config: the stac model's config.pbtxt (no server needed)."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest
import torch

from stac_backend.serving.repository import PRODUCTION, ServeSettings, render_config
from stac_backend.serving.triton_model import DENSE_OUTPUTS, OUTPUTS, dense_output_dtype

ROOT = Path(__file__).resolve().parents[2]


def output_types(text: str) -> dict[str, str]:
    return dict(re.findall(r'\{ name: "(\w+)" data_type: (\w+) dims', text))


def test_checked_in_repository_is_the_rendered_production_settings():
    text = (ROOT / "model_repository" / "stac" / "config.pbtxt").read_text()
    assert text == render_config(PRODUCTION), "model_repository/stac/config.pbtxt drifted: re-render it from PRODUCTION"
    assert PRODUCTION.output_dtype == "float32" and PRODUCTION.output_device == "cpu"


def test_float32_outputs_by_default():
    text = render_config(ServeSettings())
    types = output_types(text)
    assert set(types) == set(OUTPUTS) | {"CACHE_BYTES", "STREAM_KEY"}
    assert "TYPE_FP16" not in text and "OUTPUT_DTYPE" not in text  # the default renders exactly as before
    assert {types[n] for n in DENSE_OUTPUTS} == {"TYPE_FP32"}


def test_float16_outputs_only_for_the_dense_outputs():
    text = render_config(ServeSettings(output_dtype="float16"))
    types = output_types(text)
    assert {n for n, t in types.items() if t == "TYPE_FP16"} == set(DENSE_OUTPUTS)
    assert types["POSE_ENC"] == types["EXTRINSICS"] == types["INTRINSICS"] == "TYPE_FP32"
    assert types["FRAME_INDEX"] == types["CACHE_BYTES"] == "TYPE_INT64"
    assert 'parameters: { key: "OUTPUT_DTYPE" value: { string_value: "float16" } }' in text
    with pytest.raises(ValueError, match="output_dtype"):
        render_config(ServeSettings(output_dtype="bfloat16"))


@pytest.mark.parametrize("output_dtype", ["float32", "float16"])
def test_the_model_reads_the_rendered_config(output_dtype):
    """Triton hands the model its config as JSON of the proto: the rendered one must load."""
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient not installed (serving extra)")
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    settings = dataclasses.replace(PRODUCTION, output_dtype=output_dtype)
    proto = text_format.Parse(render_config(settings), model_config_pb2.ModelConfig())
    config = json_format.MessageToDict(proto, preserving_proto_field_name=True)
    assert dense_output_dtype(config) is {"float32": torch.float32, "float16": torch.float16}[output_dtype]


def test_settings_round_trip_through_the_rendered_config():
    """settings.py is the one schema: what render_config writes, settings_from_config reads back."""
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient not installed (serving extra)")
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    from stac_backend.serving.settings import TRITON_IDLE_MARGIN_S, settings_from_config

    s = ServeSettings(preset="", max_streams=5, max_cache_bytes=123, idle_ttl_s=7.5, max_image_pixels=1000,
                      frame_size=(56, 84), stream_keys=False, output_dtype="float16", decoupled=True,
                      cache_config={"policy": "window", "window": 8})
    proto = text_format.Parse(render_config(s), model_config_pb2.ModelConfig())
    config = json_format.MessageToDict(proto, preserving_proto_field_name=True)
    back = settings_from_config(config, "CPU")
    for name in ("preset", "max_streams", "max_cache_bytes", "idle_ttl_s", "max_image_pixels", "frame_size",
                 "stream_keys", "output_dtype", "decoupled", "cache_config", "instance_kind"):
        assert getattr(back, name) == getattr(s, name), name
    idle_us = int(config["sequence_batching"]["max_sequence_idle_microseconds"])
    assert idle_us == int((7.5 + TRITON_IDLE_MARGIN_S) * 1e6)  # a backstop well above the model's TTL
    assert config["sequence_batching"]["oldest"]["max_candidate_sequences"] == 64


def test_the_backend_interpreter_can_import_the_project():
    """The test environment installs the project, as the README does: the stub's isolated Python finds it."""
    from stac_backend.serving.repository import stub_import_problem

    assert stub_import_problem() is None


def test_a_project_the_backend_cannot_import_is_refused_before_the_server_starts(tmp_path, monkeypatch):
    from stac_backend.serving import repository
    from stac_backend.tools.tritonserver import TritonServerError

    problem = repository.stub_import_problem("stac_backend_not_installed_anywhere")
    assert "isolated mode" in problem and "pip install -e ." in problem and "PYTHONPATH" in problem
    monkeypatch.setattr(repository, "stub_import_problem", lambda: problem)
    with pytest.raises(TritonServerError, match="cannot import stac_backend_not_installed_anywhere"):
        repository.local_server(ServeSettings(preset="tiny"), tmp_path / "work")
    assert not (tmp_path / "work").exists()  # nothing written, nothing started
