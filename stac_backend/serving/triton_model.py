"""The Triton Python-backend model: a thin translation between Triton requests and StreamSessions.

``model_repository/stac/1/model.py`` re-exports ``TritonPythonModel`` from here. Configuration
comes from the model config's ``parameters`` (see ``repository.py`` for the keys).

Wire format (why uint8): frames travel as FRAMES uint8 [1, C, 3, H, W] - the camera's own 8-bit
pixels, 4x smaller than float32 on the network and in Triton's shared memory, and unable to carry
NaNs; conversion to [0, 1] floats happens on the model's device. The leading 1 is Triton's batch
dimension: one request carries one chunk of one stream.

Dense outputs (DEPTH, DEPTH_CONF, WORLD_POINTS, WORLD_POINTS_CONF: ~4.9 MB per 518x392 frame in
float32) travel as float16 when the OUTPUT_DTYPE parameter says so - half the bytes over PCIe, in
Triton's shared memory and on the network. Poses, intrinsics and FRAME_INDEX keep their types.
With OUTPUT_DEVICE=gpu (GPU instances) the float outputs are handed over as CUDA tensors: the
Python backend passes them to Triton by CUDA IPC and Triton copies them into the response, which
skips this process's device-to-host copy and the copy into the backend's shared memory.

With the decoupled transaction policy (``ServeSettings.decoupled``, ``stac serve --decoupled``)
``execute()`` returns as soon as the batch's step and the copies of its outputs to the host are
queued on the GPU, without waiting for them: a sender thread of this model waits for that batch's
copies (one CUDA event), then builds and sends the responses (the copies into the backend's shared
memory, and Triton's own copies into the gRPC responses), while Triton hands the model its next
batch and the next step's kernels queue behind the current one - the GPU does not idle between
batches while requests travel. Responses leave in the order their requests were executed, so a
stream's results stay in order. Clients must
then use gRPC streaming (``stream_infer``; ``StacClient`` and ``stac fleet`` do so by themselves,
perf_analyzer needs ``--streaming``): Triton refuses unary calls to a decoupled model.

Tensors cross the backend boundary only through DLPack (``to_dlpack`` / ``Tensor.from_dlpack``),
never through ``as_numpy()`` / ``Tensor(name, ndarray)``: those numpy paths of the Python backend
bundled with nvidia-pytriton 0.7.0 silently corrupt data when the stub's environment has numpy 2
(measured, see serving/tritonserver.py), while DLPack works with numpy 1 and 2 alike and skips a
host copy. So the model serves correctly from environments such as NGC/PyTorch images that ship
numpy 2.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.dlpack import from_dlpack, to_dlpack

try:  # only importable inside Triton's Python-backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - unit tests import this module without Triton
    pb_utils = None

from .metrics import StacMetrics
from .repository import is_decoupled
from .sessions import FrameRequest, RequestError, StepResult

log = logging.getLogger("stac.triton")

# Output tensor name -> (engine output key, wire dtype)
OUTPUTS = {
    "DEPTH": ("depth", torch.float32),
    "DEPTH_CONF": ("depth_conf", torch.float32),
    "WORLD_POINTS": ("world_points", torch.float32),
    "WORLD_POINTS_CONF": ("world_points_conf", torch.float32),
    "POSE_ENC": ("pose_enc", torch.float32),
    "EXTRINSICS": ("extrinsics", torch.float32),
    "INTRINSICS": ("intrinsics", torch.float32),
    "FRAME_INDEX": ("frame_index", torch.int64),
}
# The per-pixel outputs whose wire dtype OUTPUT_DTYPE chooses (float32 default, or float16).
DENSE_OUTPUTS = ("DEPTH", "DEPTH_CONF", "WORLD_POINTS", "WORLD_POINTS_CONF")
OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
TRITON_TYPES = {torch.float32: "TYPE_FP32", torch.float16: "TYPE_FP16"}
FP16_MAX = torch.finfo(torch.float16).max  # 65504

def read_parameters(model_config: dict[str, Any]) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def warmup_sizes(model_config: dict[str, Any], instance_kind: str) -> list[tuple[int, int]]:
    """Frame sizes (height, width) the runtime is warmed up at in initialize(), from the WARMUP
    parameter: "on" (392x518), "off", or "HEIGHTxWIDTH[,HEIGHTxWIDTH...]"; unset: on for GPU instances."""
    value = (read_parameters(model_config).get("WARMUP", "") or ("on" if instance_kind.upper() == "GPU" else "off")).strip().lower()
    if value in ("off", "false", "no", "0"):
        return []
    if value in ("on", "true", "yes", "1"):
        return [(392, 518)]
    sizes = [size.strip().split("x") for size in value.split(",")]
    if not all(len(hw) == 2 and all(x.isdigit() and int(x) > 0 for x in hw) for hw in sizes):
        raise ValueError(f"WARMUP must be on, off or frame sizes HEIGHTxWIDTH[,HEIGHTxWIDTH...], got {value!r}")
    return [(int(h), int(w)) for h, w in sizes]


def dense_output_dtype(model_config: dict[str, Any]) -> torch.dtype:
    """The wire dtype of the dense outputs: the OUTPUT_DTYPE parameter (float32 default, or float16).

    The config's ``output`` section must declare the same type for them (``render_config`` writes
    both from one setting). A mismatch is refused at load: the Python backend does not check output
    types, so clients would otherwise silently get a type other than the declared one.
    """
    name = (read_parameters(model_config).get("OUTPUT_DTYPE", "") or "float32").strip().lower()
    if name not in OUTPUT_DTYPES:
        raise ValueError(f"OUTPUT_DTYPE must be one of {sorted(OUTPUT_DTYPES)}, got {name!r}")
    dtype = OUTPUT_DTYPES[name]
    for output in model_config.get("output", []):
        declared = output.get("data_type")
        if output.get("name") in DENSE_OUTPUTS and declared and declared != TRITON_TYPES[dtype]:
            raise ValueError(
                f"OUTPUT_DTYPE={name} but the config declares {output['name']} as {declared} "
                f"(expected {TRITON_TYPES[dtype]}); re-render config.pbtxt with output_dtype={name!r}"
            )
    return dtype


def build_sessions(model_config: dict[str, Any], instance_kind: str, device_id: int, model_dir: Optional[str]):
    """Model + StreamSessions from the model config (no Triton imports: unit-testable).

    model_dir: the model's folder in the repository (Triton's args["model_repository"]); a
    relative CHECKPOINT is resolved against it.
    """
    import torch

    from ..cache import CacheConfig
    from ..engine.torch_runtime import TorchRuntime
    from ..model import build_model
    from .sessions import StreamSessions

    p = read_parameters(model_config)
    runtime = (p.get("RUNTIME", "") or "torch").strip().lower()
    if runtime == "onnxruntime":  # the exported step graph (ONNX_MODEL) on ONNX Runtime, CPU
        from ..engine.runtime import make_runtime

        engine = make_runtime("onnxruntime", params=p, model_dir=model_dir)
        return StreamSessions(engine, _limits(p, model_config))
    if runtime == "tensorrt":  # a TensorRT engine of the graph (TRT_PLAN), stac plugins in this process; GPU
        from ..engine.runtime import make_runtime

        engine = make_runtime("tensorrt", params=p, model_dir=model_dir, device=f"cuda:{device_id}")
        return StreamSessions(engine, _limits(p, model_config))
    if runtime != "torch":
        raise ValueError(f"RUNTIME must be 'torch', 'onnxruntime' or 'tensorrt', got {runtime!r}")
    device = p.get("DEVICE", "auto") or "auto"
    if device == "auto":
        device = f"cuda:{device_id}" if instance_kind.upper() == "GPU" and torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[p.get("DTYPE", "float32") or "float32"]
    checkpoint = p.get("CHECKPOINT", "")
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_absolute() and model_dir:
            path = Path(model_dir) / path
        checkpoint = str(path)
    preset = p.get("PRESET", "") or None
    if not checkpoint and preset is None:
        preset = "tiny"
    if not checkpoint:
        log.warning("no CHECKPOINT parameter: serving random weights for preset %s", preset)
    model = build_model(preset, checkpoint=checkpoint or None, device=device, dtype=dtype)
    cache = CacheConfig.from_dict(json.loads(p.get("CACHE_CONFIG", "") or "{}"))
    return StreamSessions(TorchRuntime(model, cache), _limits(p, model_config))


def _limits(p: dict[str, str], model_config: dict[str, Any]):
    from .sessions import ServingLimits

    seq = model_config.get("sequence_batching", {})
    triton_idle_s = int(seq.get("max_sequence_idle_microseconds", 1_000_000) or 1_000_000) / 1e6
    return ServingLimits(
        max_streams=int(p.get("MAX_STREAMS", "16") or 16),
        max_cache_bytes=int(p["MAX_CACHE_BYTES"]) if p.get("MAX_CACHE_BYTES") else None,
        # Never shorter than Triton's own idle timeout: a stream Triton still considers live keeps its state.
        idle_ttl_s=max(float(p.get("IDLE_TTL_S", "0") or 0), triton_idle_s),
        max_image_pixels=int(p.get("MAX_IMAGE_PIXELS", str(518 * 518)) or 518 * 518),
    )


class ResponseSender:
    """Builds and sends a decoupled model's responses on a thread of its own, in the order queued.

    ``submit`` takes one executed batch: a list of ``(send, make_response)`` pairs, and optionally
    ``ready``, an object whose ``synchronize()`` returns once the batch's outputs exist (the CUDA
    event recorded after their copies were queued). The thread waits for ``ready``, then calls
    ``send(make_response())`` for each pair, so the end of the step on the GPU, building the
    responses (the copies into the Python backend's shared memory) and Triton's side of sending
    them overlap the next batch. At most ``max_pending`` batches wait; ``submit`` blocks beyond
    that, which bounds the memory held by outputs not yet sent. A failure to build or send one
    response is logged and answered with an error where still possible; a failed ``ready`` (the
    step failed on the GPU) answers the whole batch with that error. Neither stops the thread.
    """

    def __init__(self, max_pending: int = 2):
        self._queue: "queue.Queue[Optional[list]]" = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._run, name="stac-response-sender", daemon=True)
        self._thread.start()

    def submit(self, batch: list, ready: Any = None) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the response sender thread has stopped")
        self._queue.put((batch, ready))

    def close(self, timeout_s: float = 30.0) -> None:
        """Send what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch, ready = item
            failure = None
            if ready is not None:
                try:
                    ready.synchronize()
                except Exception as exc:  # noqa: BLE001 - e.g. a device-side error in the step
                    log.exception("the batch's outputs could not be made ready")
                    failure = f"the step failed on the device: {exc}"
            for send, make_response in batch:
                try:
                    if failure is not None:
                        send(pb_utils.InferenceResponse(error=pb_utils.TritonError(failure)))
                    else:
                        send(make_response())
                except Exception as exc:  # noqa: BLE001 - one broken response must not stop the others
                    log.exception("could not send a response")
                    try:
                        send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"could not send the result: {exc}")))
                    except Exception:  # noqa: BLE001 - the request is gone (client cancelled, already final)
                        pass


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.model_config = json.loads(args["model_config"])
        self.dense_dtype = dense_output_dtype(self.model_config)  # checked before the (slow) model load
        self.outputs_on_gpu = output_device(self.model_config, args.get("model_instance_kind", "CPU")) == "gpu"
        repository = args.get("model_repository")
        self.sessions = build_sessions(
            self.model_config, args.get("model_instance_kind", "CPU"), int(args.get("model_instance_device_id", 0) or 0), repository
        )
        for image_hw in warmup_sizes(self.model_config, args.get("model_instance_kind", "CPU")):  # before any request
            batch = (1, int(self.model_config.get("max_batch_size", 1) or 1))
            log.info("warm-up at %dx%d: %s", *image_hw, self.sessions.runtime.warmup(image_hw, batch))
        self._metrics = StacMetrics(pb_utils, self.model_config.get("name", "stac"), args.get("model_version", "1"))
        self._sender = ResponseSender() if is_decoupled(self.model_config) else None  # None: unary

    def execute(self, requests):
        started = time.perf_counter()
        parsed = [self._parse(r) for r in requests]
        ok = [i for i, p in enumerate(parsed) if isinstance(p, FrameRequest)]  # null requests are None
        results: list[Any] = list(parsed)
        if ok:
            for i, result in zip(ok, self.sessions.handle([parsed[i] for i in ok])):
                results[i] = result
        # The outputs' copies (to the host, or to their own GPU buffers) are queued here, in execute
        # order. Unary: they are waited for before returning. Decoupled: only the sender thread waits,
        # on one event recorded behind them, so this returns while the GPU finishes the step.
        decoupled = self._sender is not None
        prepared = [self._prepare(result, request, non_blocking=decoupled) for result, request in zip(results, requests)]
        self._metrics.observe_execute(self.sessions.stats(), time.perf_counter() - started, len(requests))
        if not decoupled:
            return [_make_response(ready) for ready in prepared]
        ready_event = _event_after(results)
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        batch = []
        for ready, request in zip(prepared, requests):
            sender = request.get_response_sender()
            batch.append((lambda response, sender=sender: sender.send(response, flags=final),
                          lambda ready=ready: _make_response(ready)))
        self._sender.submit(batch, ready=ready_event)
        return None

    def finalize(self) -> None:
        if self._sender is not None:
            self._sender.close()
        self.sessions.close_all()
        self._metrics.close()

    # ------------------------------------------------------------------ translation
    def _parse(self, request):
        try:
            ready = pb_utils.get_input_tensor_by_name(request, "READY")
            if ready is not None and not _first_flag(ready):
                return None
            start = _control(request, "START", pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START)
            end = _control(request, "END", pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END)
            # The sequence batcher hands every request its correlation id; reading it from the
            # request (not the UINT64 CORRID tensor) needs no unsigned-64 DLPack support.
            corr_id = request.correlation_id()
            tensor = pb_utils.get_input_tensor_by_name(request, "FRAMES")
            if tensor is None:
                return RequestError("missing input FRAMES (uint8 [1, frames, 3, H, W])")
            frames = _to_torch(tensor)
            if frames.dim() != 5 or frames.shape[0] != 1:
                return RequestError(
                    f"FRAMES must be [1, frames, 3, H, W] (one chunk per request), got shape {list(frames.shape)}"
                )
            return FrameRequest(corr_id=corr_id, start=start, end=end, frames=frames[0])
        except Exception as exc:  # noqa: BLE001 - any malformed request is that client's error
            return RequestError(f"malformed request: {exc}")

    def _prepare(self, result, request, non_blocking: bool = False):
        """What the response will carry: None (a null request), a RequestError, or a dict of output
        name -> tensor in wire dtype (on the host, or on the GPU with OUTPUT_DEVICE=gpu).

        non_blocking: host outputs are only queued for copying (see ``outputs_on_host``); the
        caller waits for the device before reading them."""
        if result is None or isinstance(result, RequestError):
            return result
        assert isinstance(result, StepResult)
        # Only what the client asked for leaves the GPU and crosses the wire (Triton lists every output
        # when a client names none).
        wanted = set(request.requested_output_names())
        names = [name for name in OUTPUTS if name in wanted]
        if self.outputs_on_gpu:
            ready = outputs_on_device(result.outputs, names, self.dense_dtype)
        else:
            ready = outputs_on_host(result.outputs, names, self.dense_dtype, non_blocking=non_blocking)
        if "CACHE_BYTES" in wanted:
            ready["CACHE_BYTES"] = torch.tensor([result.cache_bytes], dtype=torch.int64)
        return ready


def _event_after(results) -> Optional["torch.cuda.Event"]:
    """A CUDA event recorded on the current stream of the device the batch's outputs live on, behind
    every copy queued so far (None when no output is on a GPU: nothing to wait for)."""
    device = next((v.device for r in results if isinstance(r, StepResult) for v in r.outputs.values()
                   if isinstance(v, torch.Tensor) and v.is_cuda), None)
    if device is None:
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def _make_response(ready):
    """The InferenceResponse for what ``TritonPythonModel._prepare`` returned."""
    if ready is None:  # a null request (direct strategy, idle slot): nothing to compute, nothing touched
        return pb_utils.InferenceResponse(output_tensors=[])
    if isinstance(ready, RequestError):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(ready)))
    return pb_utils.InferenceResponse(output_tensors=[_from_torch(name, value.unsqueeze(0)) for name, value in ready.items()])


def output_device(model_config: dict[str, Any], instance_kind: str) -> str:
    """The OUTPUT_DEVICE parameter (cpu default, or gpu); gpu needs a GPU instance."""
    name = (read_parameters(model_config).get("OUTPUT_DEVICE", "") or "cpu").strip().lower()
    if name not in ("cpu", "gpu"):
        raise ValueError(f"OUTPUT_DEVICE must be 'cpu' or 'gpu', got {name!r}")
    if name == "gpu" and instance_kind.upper() != "GPU":
        raise ValueError(f"OUTPUT_DEVICE=gpu needs a KIND_GPU instance, this one is {instance_kind}")
    return name


def _wire_outputs(names: Optional[list[str]], dense_dtype: torch.dtype) -> dict[str, tuple[str, torch.dtype]]:
    """Output name -> (key in the step's outputs, wire dtype) for ``names`` (default all of OUTPUTS):
    DENSE_OUTPUTS in ``dense_dtype``, the others in OUTPUTS' dtypes."""
    if dense_dtype not in TRITON_TYPES:
        raise ValueError(f"dense_dtype must be torch.float32 or torch.float16, got {dense_dtype}")
    return {name: (OUTPUTS[name][0], dense_dtype if name in DENSE_OUTPUTS else OUTPUTS[name][1])
            for name in (OUTPUTS if names is None else names)}


def outputs_on_device(outputs: dict[str, torch.Tensor], names: Optional[list[str]] = None,
                      dense_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A step's outputs (``names``, default all of OUTPUTS) in wire dtypes, the float ones left on the
    model's device (OUTPUT_DEVICE=gpu), each its own contiguous tensor (one allocation per output,
    so each can be shared by CUDA IPC on its own); FRAME_INDEX (a few int64s) goes to the host.
    Values beyond float16's finite range are clamped as in ``outputs_on_host``."""
    ready: dict[str, torch.Tensor] = {}
    for name, (key, dtype) in _wire_outputs(names, dense_dtype).items():
        value = outputs[key].detach()
        if dtype in (torch.float32, torch.float16):
            value = value.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
            if dtype is torch.float16:
                value.clamp_(-FP16_MAX, FP16_MAX)
        else:
            value = value.to(device="cpu", dtype=dtype).contiguous()
        ready[name] = value
    return ready


def outputs_on_host(outputs: dict[str, torch.Tensor], names: Optional[list[str]] = None,
                    dense_dtype: torch.dtype = torch.float32, non_blocking: bool = False) -> dict[str, torch.Tensor]:
    """A step's outputs (``names``, default all of OUTPUTS) as contiguous host tensors in wire dtypes.

    dense_dtype: the wire dtype of DENSE_OUTPUTS (float32, or float16 to halve their bytes); the
    other outputs keep OUTPUTS' dtypes.

    The cast to the wire dtype happens on the model's device, before the copy, so float16 halves the
    PCIe traffic too. On a GPU the outputs (~5 MB per 518x392 frame in float32) leave in one
    device-to-host copy per wire dtype into pinned memory - full PCIe speed and a fixed number of
    synchronisations - instead of one pageable copy per output; the results are views of those
    buffers. Values beyond float16's finite range (|x| > 65504) are clamped to +-65504 rather than
    sent as inf (NaN stays NaN).

    non_blocking: on a GPU, only queue the copies on the current stream and return at once; the
    values are there once that stream has passed them (an event recorded after this call, waited
    for before reading), which lets the host go on to the next batch while the GPU finishes.
    """
    selected = _wire_outputs(names, dense_dtype)
    host_outputs: dict[str, torch.Tensor] = {}
    for group_dtype in dict.fromkeys(dtype for _, dtype in selected.values()):  # one buffer, one copy per wire dtype
        group = [(name, outputs[key].detach()) for name, (key, dtype) in selected.items() if dtype is group_dtype]
        flat = torch.cat([value.reshape(-1).to(group_dtype) for _, value in group])
        if group_dtype is torch.float16:
            flat.clamp_(-FP16_MAX, FP16_MAX)  # out-of-range values became inf in the cast: send the largest finite
        if flat.is_cuda:
            host = torch.empty(flat.shape, dtype=group_dtype, pin_memory=True)
            host.copy_(flat, non_blocking=non_blocking)
            flat = host
        offset = 0
        for name, value in group:
            host_outputs[name] = flat[offset:offset + value.numel()].view(value.shape)
            offset += value.numel()
    return {name: host_outputs[name] for name in selected}


def _to_torch(tensor) -> torch.Tensor:
    """A request's input as a torch tensor (zero-copy view of Triton's buffer, valid during execute)."""
    return from_dlpack(tensor.to_dlpack())


def _from_torch(name: str, value: torch.Tensor):
    """A host output tensor handed to Triton without a numpy round trip."""
    return pb_utils.Tensor.from_dlpack(name, to_dlpack(value))


def _first_flag(tensor) -> bool:
    return bool(_to_torch(tensor).reshape(-1)[0].item())


def _control(request, name: str, flag: int) -> bool:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is not None:
        return _first_flag(tensor)
    return bool(request.flags() & flag)
