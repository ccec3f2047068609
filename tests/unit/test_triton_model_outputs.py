"""outputs_on_host: what the Triton model hands to Triton (no server needed)."""

from __future__ import annotations

import pytest
import torch

from stac_backend.serving.triton_model import DENSE_OUTPUTS, OUTPUTS, dense_output_dtype, outputs_on_host

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def step_outputs(device: str, frames: int = 2, h: int = 14, w: int = 28) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"depth": (frames, h, w), "depth_conf": (frames, h, w), "world_points": (frames, h, w, 3),
              "world_points_conf": (frames, h, w), "pose_enc": (frames, 9), "extrinsics": (frames, 3, 4),
              "intrinsics": (frames, 3, 3)}
    out = {k: torch.randn(*s, generator=g).to(device=device, dtype=torch.bfloat16) for k, s in shapes.items()}
    out["frame_index"] = torch.arange(5, 5 + frames, device=device)
    return out


@pytest.mark.parametrize("non_blocking", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_outputs_on_host_are_the_values_in_wire_dtypes(device, non_blocking):
    outputs = step_outputs(device)
    host = outputs_on_host(outputs, non_blocking=non_blocking)
    if non_blocking and device == "cuda":  # only queued: wait as the decoupled model's sender does
        event = torch.cuda.Event()
        event.record()
        event.synchronize()
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


# ---------------------------------------------------------------- float16 dense outputs (OUTPUT_DTYPE)
@pytest.mark.parametrize("device", DEVICES)
def test_float16_dense_outputs_poses_stay_float32(device):
    outputs = step_outputs(device)
    host = outputs_on_host(outputs, dense_dtype=torch.float16)
    assert list(host) == list(OUTPUTS)
    for name, (key, dtype) in OUTPUTS.items():
        value = host[name]
        want = torch.float16 if name in DENSE_OUTPUTS else dtype
        assert value.device.type == "cpu" and value.dtype == want and value.is_contiguous(), name
        assert value.shape == outputs[key].shape
        # bf16 -> fp16 is exact in range; poses and FRAME_INDEX are the float32/int64 values as before
        assert torch.equal(value, outputs[key].to(want).cpu()), name


def test_float16_rounds_to_nearest_and_clamps_to_the_finite_range():
    outputs = step_outputs("cpu", frames=1, h=1, w=6)
    depth = torch.tensor([[[1 / 3, 100.0 + 1 / 3, 65504.0, 1e5, float("inf"), float("nan")]]])
    points = torch.full((1, 1, 6, 3), -1e6)
    outputs.update(depth=depth, world_points=points.to(torch.bfloat16))  # a bf16 -1e6 too: no inf via rounding
    host = outputs_on_host(outputs, ["DEPTH", "WORLD_POINTS", "POSE_ENC"], dense_dtype=torch.float16)
    got = host["DEPTH"].float()[0, 0]
    assert abs(got[0] - 1 / 3) <= 2**-11 / 3 and abs(got[1] - (100 + 1 / 3)) <= 2**-11 * 100.4  # relative <= 2^-11
    assert got[2:5].tolist() == [65504.0, 65504.0, 65504.0] and torch.isnan(got[5])
    assert bool((host["WORLD_POINTS"] == -65504.0).all())
    assert host["POSE_ENC"].dtype == torch.float32


def test_float16_selection_and_no_aliasing():
    outputs = step_outputs("cpu")
    host = outputs_on_host(outputs, ["DEPTH", "DEPTH_CONF"], dense_dtype=torch.float16)  # only float16 leaves
    assert [v.dtype for v in host.values()] == [torch.float16, torch.float16]
    host["DEPTH"].fill_(7.0)
    assert not bool((host["DEPTH_CONF"] == 7.0).all())
    poses = outputs_on_host(outputs, ["EXTRINSICS", "FRAME_INDEX"], dense_dtype=torch.float16)  # no dense output
    assert poses["EXTRINSICS"].dtype == torch.float32 and poses["FRAME_INDEX"].dtype == torch.int64
    with pytest.raises(ValueError, match="dense_dtype"):
        outputs_on_host(outputs, dense_dtype=torch.bfloat16)


def _config(output_dtype=None, dense_type=None):
    config = {"parameters": {}, "output": []}
    if output_dtype is not None:
        config["parameters"]["OUTPUT_DTYPE"] = {"string_value": output_dtype}
    if dense_type is not None:
        config["output"] = [{"name": n, "data_type": dense_type} for n in DENSE_OUTPUTS]
        config["output"].append({"name": "POSE_ENC", "data_type": "TYPE_FP32"})
    return config


def test_dense_output_dtype_parameter():
    assert dense_output_dtype(_config()) is torch.float32  # no parameter: the float32 default
    assert dense_output_dtype(_config("", "TYPE_FP32")) is torch.float32
    assert dense_output_dtype(_config("float16", "TYPE_FP16")) is torch.float16
    with pytest.raises(ValueError, match="OUTPUT_DTYPE must be"):
        dense_output_dtype(_config("bfloat16"))
    # The model must send what config.pbtxt declares: a mismatch is refused at load.
    with pytest.raises(ValueError, match="declares DEPTH as TYPE_FP32"):
        dense_output_dtype(_config("float16", "TYPE_FP32"))
    with pytest.raises(ValueError, match="declares DEPTH as TYPE_FP16"):
        dense_output_dtype(_config(None, "TYPE_FP16"))


@pytest.mark.parametrize("device", DEVICES)
def test_outputs_on_device_keep_float_outputs_on_the_device(device):
    from stac_backend.serving.triton_model import outputs_on_device

    outputs = step_outputs(device)
    for dense in (torch.float32, torch.float16):
        ready = outputs_on_device(outputs, None, dense)
        assert list(ready) == list(OUTPUTS)
        for name, (key, dtype) in OUTPUTS.items():
            want = dense if name in DENSE_OUTPUTS else dtype
            value = ready[name]
            assert value.dtype == want and value.is_contiguous(), name
            assert value.device.type == ("cpu" if want is torch.int64 else device), name
            assert torch.equal(value.cpu(), outputs[key].to(want).cpu()), name
        # each float output owns its memory (shared one by one by CUDA IPC)
        ptrs = [v.untyped_storage().data_ptr() for v in ready.values()]
        assert len(set(ptrs)) == len(ptrs)
        assert all(ready[n].untyped_storage().data_ptr() != outputs[OUTPUTS[n][0]].untyped_storage().data_ptr()
                   for n in DENSE_OUTPUTS)


def test_output_device_parameter_and_rendering():
    from stac_backend.serving.repository import ServeSettings, render_config
    from stac_backend.serving.triton_model import output_device

    def config(value):
        return {"parameters": {"OUTPUT_DEVICE": {"string_value": value}}}

    assert output_device({}, "GPU") == "cpu" and output_device(config("gpu"), "GPU") == "gpu"
    with pytest.raises(ValueError, match="KIND_GPU"):
        output_device(config("gpu"), "CPU")
    with pytest.raises(ValueError, match="OUTPUT_DEVICE"):
        output_device(config("tpu"), "GPU")
    assert "OUTPUT_DEVICE" not in render_config(ServeSettings())
    assert '"OUTPUT_DEVICE" value: { string_value: "gpu" }' in render_config(ServeSettings(instance_kind="KIND_GPU", output_device="gpu"))
    with pytest.raises(ValueError, match="GPU instance"):
        render_config(ServeSettings(output_device="gpu"))


def test_response_sender_sends_in_order_and_survives_a_failed_response():
    """The decoupled model's sender thread: batches leave in submit order, a response that cannot be
    built does not stop the ones after it, and close() sends what is queued before stopping."""
    import threading

    from stac_backend.serving.triton_model import ResponseSender

    sent: list = []
    gate = threading.Event()

    def make(value):
        def build():
            gate.wait(5)  # hold the thread until all batches are queued
            if value == "broken":
                raise RuntimeError("cannot build")
            return value
        return build

    sender = ResponseSender(max_pending=4)
    for batch in (["a", "b"], ["broken", "c"], ["d"]):
        sender.submit([(sent.append, make(v)) for v in batch])
    gate.set()
    sender.close()
    # "broken" got no response of its own here (no Triton to build an error response), "c" still did
    assert sent == ["a", "b", "c", "d"]
    with pytest.raises(RuntimeError, match="stopped"):
        sender.submit([])


def test_response_sender_waits_for_the_batch_and_answers_a_failed_device_with_errors(monkeypatch):
    """Decoupled: execute() hands over a batch with the event behind its output copies. The sender
    builds no response before that event is done; a failed event (the step failed on the device)
    answers that batch's requests with the error, and the next batch is sent as usual."""
    import threading
    from types import SimpleNamespace

    from stac_backend.serving import triton_model
    from stac_backend.serving.triton_model import ResponseSender

    monkeypatch.setattr(triton_model, "pb_utils", SimpleNamespace(
        TritonError=lambda message: message, InferenceResponse=lambda error=None: ("error", error)))
    log: list = []
    release = threading.Event()

    class Ready:
        def __init__(self, fail=False):
            self.fail = fail

        def synchronize(self):
            release.wait(5)
            log.append("ready")
            if self.fail:
                raise RuntimeError("device-side assert")

    def make(value):
        return lambda: log.append(f"built {value}") or value

    sender = ResponseSender(max_pending=4)
    sender.submit([(log.append, make("a"))], ready=Ready())
    sender.submit([(log.append, make("b")), (log.append, make("c"))], ready=Ready(fail=True))
    sender.submit([(log.append, make("d"))])  # no device work: nothing to wait for
    assert log == []  # nothing built while the first batch's outputs are not ready
    release.set()
    sender.close()
    error = ("error", "the step failed on the device: device-side assert")
    assert log == ["ready", "built a", "a", "ready", error, error, "built d", "d"]
