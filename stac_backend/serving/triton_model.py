"""The Triton Python-backend model: a thin translation between Triton requests and StreamSessions.

``model_repository/stac/1/model.py`` re-exports ``TritonPythonModel`` from here; its settings come
from the model config (``settings.py``). Frames arrive as FRAMES uint8 [1, C, 3, H, W] (one chunk of
one stream; the leading 1 is Triton's batch dimension) and become [0, 1] floats on the model's
device. Dense outputs travel as float32, or float16 with OUTPUT_DTYPE=float16; with OUTPUT_DEVICE=gpu
they are handed to Triton as CUDA tensors (CUDA IPC) instead of host copies.

Decoupled (``ServeSettings.decoupled``): ``execute()`` returns once a batch's step and the copies of
its outputs are queued on the GPU; a sender thread waits for them (one CUDA event) and sends the
responses in execute order while the next batch computes. Clients must then use gRPC streaming.

Besides batches, a housekeeping thread expires silent streams and ends in Triton the sequences of
streams the model ended on its own (``sessions.py``), so that their slots are free at once.

Tensors cross the backend boundary only through DLPack, never through ``as_numpy()`` /
``Tensor(name, ndarray)``: those numpy paths of the Python backend bundled with nvidia-pytriton
0.7.0 corrupt data when the stub's environment has numpy 2, while DLPack works with numpy 1 and 2.
"""

from __future__ import annotations

import hmac
import json
import os
import logging
import queue
import secrets
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
from .sessions import INVALID_ARG, FrameRequest, RequestError, StepResult
from .settings import is_decoupled, read_parameters, settings_from_config

log = logging.getLogger("stac.triton")
IDLE_GRACE_S = 0.5  # no batch for this long: nothing waits in Triton's queue
RELEASE = object()  # what _parse makes of the model's own END requests (answered empty)

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

def warmup_sizes(model_config: dict[str, Any], instance_kind: str) -> list[tuple[int, int]]:
    """Frame sizes (height, width) the runtime is warmed up at in initialize(), from the WARMUP
    parameter: "on" (392x518), "off", or "HEIGHTxWIDTH[,HEIGHTxWIDTH...]"; unset: on for GPU instances."""
    value = (settings_from_config(model_config, instance_kind).warmup
             or ("on" if instance_kind.upper() in ("GPU", "KIND_GPU") else "off")).strip().lower()
    if value in ("off", "false", "no", "0"):
        return []
    if value in ("on", "true", "yes", "1"):
        return [(392, 518)]
    sizes = [size.strip().split("x") for size in value.split(",")]
    if not all(len(hw) == 2 and all(x.isdigit() and int(x) > 0 for x in hw) for hw in sizes):
        raise ValueError(f"WARMUP must be on, off or frame sizes HEIGHTxWIDTH[,HEIGHTxWIDTH...], got {value!r}")
    return [(int(h), int(w)) for h, w in sizes]


def compile_choice(setting: Optional[bool], device: str, model_config: dict[str, Any], instance_kind: str) -> Optional[bool]:
    """COMPILE: an explicit 0/1 wins; auto compiles on CUDA instances that warm up (the warm-up
    compiles every bucket before the first request; it wins 1.12x at 8 streams on an H100,
    docs/performance.md), unless STAC_COMPILE in the environment decides (None)."""
    if setting is not None:
        return setting
    from ..model.compiled import SWITCH_ENV

    if os.environ.get(SWITCH_ENV) is not None:
        return None
    return str(device).startswith("cuda") and bool(warmup_sizes(model_config, instance_kind))


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
    """Runtime + StreamSessions from the model config (no Triton imports: unit-testable).

    model_dir: the model's folder in the repository (Triton's args["model_repository"]); relative
    CHECKPOINT / ONNX_MODEL / TRT_PLAN paths are resolved against it.
    """
    from ..engine.runtime import make_runtime
    from .sessions import StreamSessions

    settings = settings_from_config(model_config, instance_kind)
    limits = settings.limits()
    if settings.runtime in ("onnxruntime", "tensorrt"):  # the exported step graph; options are theirs to read
        options = {"device": f"cuda:{device_id}"} if settings.runtime == "tensorrt" else {}
        return StreamSessions(make_runtime(settings.runtime, params=read_parameters(model_config),
                                           model_dir=model_dir, **options), limits)
    if settings.runtime != "torch":
        raise ValueError(f"RUNTIME must be 'torch', 'onnxruntime' or 'tensorrt', got {settings.runtime!r}")
    from ..cache import CacheConfig
    from ..model import build_model

    device = settings.device or "auto"
    if device == "auto":
        device = f"cuda:{device_id}" if settings.instance_kind == "KIND_GPU" and torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[settings.dtype or "float32"]
    checkpoint = settings.checkpoint
    if checkpoint and not Path(checkpoint).is_absolute() and model_dir:
        checkpoint = str(Path(model_dir) / checkpoint)
    preset = settings.preset or None
    if not checkpoint and preset is None:
        preset = "tiny"
    if not checkpoint:
        log.warning("no CHECKPOINT parameter: serving random weights for preset %s", preset)
    model = build_model(preset, checkpoint=checkpoint or None, device=device, dtype=dtype,
                        compile=compile_choice(settings.compile, device, model_config, instance_kind),
                        cuda_graphs=settings.cuda_graphs,  # auto leaves STAC_CUDA_GRAPHS to decide
                        fp8=settings.fp8 or None)  # FP8 off leaves STAC_FP8 to decide
    runtime = make_runtime("torch", model=model, cache_config=CacheConfig.from_dict(settings.cache_config))
    return StreamSessions(runtime, limits)


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
        _log_to_triton()
        self.sessions = build_sessions(
            self.model_config, args.get("model_instance_kind", "CPU"), int(args.get("model_instance_device_id", 0) or 0), repository
        )
        for image_hw in warmup_sizes(self.model_config, args.get("model_instance_kind", "CPU")):  # before any request
            batch = (1, int(self.model_config.get("max_batch_size", 1) or 1))
            log.info("warm-up at %dx%d: %s", *image_hw, self.sessions.runtime.warmup(image_hw, batch))
        self._metrics = StacMetrics(pb_utils, self.model_config.get("name", "stac"), args.get("model_version", "1"))
        self._release_key = secrets.token_bytes(16)  # marks this instance's own END requests (see _housekeeping)
        self._stop = threading.Event()
        self._housekeeper = threading.Thread(target=self._housekeeping, name="stac-housekeeping", daemon=True)
        self._sender = ResponseSender() if is_decoupled(self.model_config) else None  # None: unary
        self._wake = threading.Event()
        self._max_batch = max(1, int(self.model_config.get("max_batch_size", 1) or 1))
        self._executing, self._last_batch = False, time.monotonic()
        self._housekeeper.start()

    def execute(self, requests):
        self._executing = True
        try:
            return self._execute(requests)
        finally:
            self._executing = False
            self._last_batch = time.monotonic()

    def _execute(self, requests):
        started = time.perf_counter()
        parsed = [self._parse(r) for r in requests]
        ok = [i for i, p in enumerate(parsed) if isinstance(p, FrameRequest)]  # null requests are None
        results: list[Any] = list(parsed)
        if ok:
            # A full batch means more requests may wait in Triton's queue: their streams are not silent.
            # (Null requests of the direct strategy fill idle slots: they are not traffic.)
            expire = sum(p is not None for p in parsed) < self._max_batch
            for i, result in zip(ok, self.sessions.handle([parsed[i] for i in ok], expire=expire)):
                results[i] = result
        # The outputs' copies (to the host, or to their own GPU buffers) are queued here, in execute
        # order. Unary: they are waited for before returning. Decoupled: only the sender thread waits,
        # on one event recorded behind them, so this returns while the GPU finishes the step.
        decoupled = self._sender is not None
        prepared = [self._prepare(result, request, non_blocking=decoupled) for result, request in zip(results, requests)]
        self._metrics.observe_execute(self.sessions.stats(), time.perf_counter() - started, len(requests))
        self._wake.set()  # release the Triton sequences of streams this batch ended
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
        self._stop.set()
        self._wake.set()
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
            key_tensor = pb_utils.get_input_tensor_by_name(request, "STREAM_KEY")
            key = None
            if key_tensor is not None:
                key = _to_torch(key_tensor).reshape(-1).to(torch.int64).contiguous().numpy().tobytes()
                if end and hmac.compare_digest(key, self._release_key):
                    return RELEASE  # this instance's own END for a sequence it ended: nothing to do
            tensor = pb_utils.get_input_tensor_by_name(request, "FRAMES")
            if tensor is None:
                raise RequestError("missing input FRAMES (uint8 [1, frames, 3, H, W])")
            frames = _to_torch(tensor)  # a view of Triton's buffer: shapes are checked before any copy
            if frames.dim() != 5 or frames.shape[0] != 1:
                raise RequestError(
                    f"FRAMES must be [1, frames, 3, H, W] (one chunk per request), got shape {list(frames.shape)}"
                )
            is_cancelled = getattr(request, "is_cancelled", None) or (lambda: False)
            return FrameRequest(corr_id=corr_id, start=start, end=end, frames=frames[0], key=key,
                                cancelled=is_cancelled)
        except Exception as exc:  # noqa: BLE001 - any malformed request is that client's error
            error = exc if isinstance(exc, RequestError) else RequestError(f"malformed request: {exc}", INVALID_ARG)
            log.warning("stream %s: request refused (%s): %s", _corr_id(request), error.code, error)
            return error

    def _housekeeping(self) -> None:
        """Between batches: free streams silent past the TTL, and end in Triton the sequences of streams
        the model ended on its own (an END request to this model, marked with the instance's release
        key), so that their sequence slots are free at once rather than after Triton's idle timeout."""
        interval = max(0.05, min(1.0, self.sessions.limits.idle_ttl_s / 4))
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                # Only while Triton calls no batch (then its queue is empty): a request waiting there
                # means its stream is not silent, however long the wait.
                if not self._executing and time.monotonic() - self._last_batch > IDLE_GRACE_S:
                    self.sessions.expire_idle()
                for corr_id in self.sessions.take_releases():
                    self._end_sequence(corr_id)
            except Exception:  # noqa: BLE001 - housekeeping must outlive any single failure
                log.exception("housekeeping failed")

    def _end_sequence(self, corr_id) -> None:
        frames_dims = next((i.get("dims") for i in self.model_config.get("input", []) if i["name"] == "FRAMES"), [])
        height, width = (max(1, int(d)) for d in (frames_dims or [-1, 3, -1, -1])[-2:])
        empty = torch.zeros((1, 0, 3, height, width), dtype=torch.uint8)
        key = torch.frombuffer(bytearray(self._release_key), dtype=torch.int64).reshape(1, 2)
        request = pb_utils.InferenceRequest(
            model_name=self.model_config.get("name", "stac"),
            inputs=[_from_torch("FRAMES", empty), _from_torch("STREAM_KEY", key)],
            requested_output_names=[], correlation_id=corr_id,
            flags=pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END,
        )
        if self._sender is not None:  # a decoupled model answers with a stream of responses
            for _ in request.exec(decoupled=True):
                pass
        else:
            request.exec()

    def _prepare(self, result, request, non_blocking: bool = False):
        """What the response will carry: None (a null request), a RequestError, or a dict of output
        name -> tensor in wire dtype (on the host, or on the GPU with OUTPUT_DEVICE=gpu).

        non_blocking: host outputs are only queued for copying (see ``outputs_on_host``); the
        caller waits for the device before reading them."""
        if result is None or result is RELEASE or isinstance(result, RequestError):
            return None if result is RELEASE else result
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
        if "STREAM_KEY" in wanted and result.stream_key is not None:
            ready["STREAM_KEY"] = torch.frombuffer(bytearray(result.stream_key), dtype=torch.int64)
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
        code = getattr(pb_utils.TritonError, ready.code, pb_utils.TritonError.INTERNAL)
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(ready), code))
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


def _corr_id(request):
    try:
        return request.correlation_id()
    except Exception:  # noqa: BLE001 - only for a log line
        return "?"


class _TritonLogHandler(logging.Handler):
    """Forwards this package's log records to Triton's log (pb_utils.Logger)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno >= logging.ERROR:
                pb_utils.Logger.log_error(message)
            elif record.levelno >= logging.WARNING:
                pb_utils.Logger.log_warn(message)
            else:
                pb_utils.Logger.log_info(message)
        except Exception:  # noqa: BLE001 - logging must never fail a request
            pass


def _log_to_triton() -> None:
    root = logging.getLogger("stac")
    if pb_utils is None or not hasattr(pb_utils, "Logger") or any(isinstance(h, _TritonLogHandler) for h in root.handlers):
        return
    root.addHandler(_TritonLogHandler())
    root.setLevel(logging.INFO)
    root.propagate = False


def _first_flag(tensor) -> bool:
    return bool(_to_torch(tensor).reshape(-1)[0].item())


def _control(request, name: str, flag: int) -> bool:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is not None:
        return _first_flag(tensor)
    return bool(request.flags() & flag)
