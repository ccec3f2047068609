"""outputs_on_host: what the Triton model hands to Triton (no server needed)."""

from __future__ import annotations

import pytest
import torch

from stac_backend.serving.triton_model import OUTPUTS, outputs_on_host

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def step_outputs(device: str, frames: int = 2, h: int = 14, w: int = 28) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"depth": (frames, h, w), "depth_conf": (frames, h, w), "world_points": (frames, h, w, 3),
              "world_points_conf": (frames, h, w), "pose_enc": (frames, 9), "extrinsics": (frames, 3, 4),
              "intrinsics": (frames, 3, 3)}
    out = {k: torch.randn(*s, generator=g).to(device=device, dtype=torch.bfloat16) for k, s in shapes.items()}
    out["frame_index"] = torch.arange(5, 5 + frames, device=device)
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_outputs_on_host_are_the_values_in_wire_dtypes(device):
    outputs = step_outputs(device)
    host = outputs_on_host(outputs)
    assert list(host) == list(OUTPUTS)
    for name, (key, dtype) in OUTPUTS.items():
        value = host[name]
        assert value.device.type == "cpu" and value.dtype == dtype and value.is_contiguous()
        assert value.shape == outputs[key].shape
        assert torch.equal(value, outputs[key].to(dtype).cpu()), name


def test_float_outputs_do_not_alias_each_other():
    host = outputs_on_host(step_outputs("cpu"))
    host["DEPTH"].fill_(7.0)
    assert not bool((host["DEPTH_CONF"] == 7.0).all())


def test_outputs_on_host_selects_names():
    outputs = step_outputs("cpu")
    host = outputs_on_host(outputs, ["POSE_ENC", "FRAME_INDEX", "DEPTH"])
    assert list(host) == ["POSE_ENC", "FRAME_INDEX", "DEPTH"]
    assert torch.equal(host["DEPTH"], outputs["depth"].float())
    assert list(outputs_on_host(outputs, ["FRAME_INDEX"])) == ["FRAME_INDEX"]  # no float output at all
