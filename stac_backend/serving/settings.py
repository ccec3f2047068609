"""The serving settings: one schema for what a deployment of the ``stac`` model chooses.

``ServeSettings`` is written into a Triton model config by ``repository.render_config`` (parameters,
sequence batching, input shapes) and read back inside the server by ``settings_from_config``: this
module is the only place where model-config parameters are named, written and parsed, and where the
serving defaults live.

Model-config parameters (all strings; written only where they differ from the default, so that older
configs keep their meaning):
  PRESET           model preset (tiny, vggt-1b); empty = the checkpoint's own config
  CHECKPOINT       weights file, absolute or relative to the model's folder (<repo>/stac); empty = random weights
  DTYPE            float32 | bfloat16 | float16
  DEVICE           auto (GPU instance -> its GPU, else CPU) | cpu | cuda:N
  CACHE_CONFIG     JSON of CacheConfig fields (policy, window, hh, memory_budget_bytes, ...)
  MAX_STREAMS      live streams per model instance
  MAX_CACHE_BYTES  cap on the sum of live streams' memory bounds (empty = none)
  IDLE_TTL_S       seconds of client silence (since the stream's last answer) before it is freed
  MAX_IMAGE_PIXELS frames larger than this (H * W) are refused as oversized
  STREAM_KEYS      1 (default) | 0: a START's answer carries a secret STREAM_KEY that every later
                   request of the stream must send (0 only for clients that cannot, e.g. perf_analyzer)
  OUTPUT_DTYPE     float32 (default) | float16: wire dtype of the dense outputs
  OUTPUT_DEVICE    cpu (default) | gpu: float outputs handed to Triton as CUDA tensors (GPU instances)
  IMAGE_SIZE       for clients: the frame width the model was trained at (frames are RGB uint8)
  PREPROCESS       for clients: crop | pad, VGGT's preprocessing to IMAGE_SIZE (stac_backend.protocol)
  WARMUP           on (392x518) | off | HEIGHTxWIDTH[,...]: warm the runtime up at these frame sizes
                   before serving (every kernel once, step memory measured); unset: on for GPU instances
  COMPILE          auto (default) | 0 | 1: torch runtime only: the cache-free parts of a step torch.compiled,
                   every bucket compiled by the warm-up (docs/performance.md); auto: on for CUDA
                   instances that warm up (STAC_COMPILE=0|1 in the server's environment decides instead)
  CUDA_GRAPHS      auto (default) | 0 | 1: torch runtime only: the cache-free parts of the one- and
                   two-stream steps replayed as CUDA graphs (of the compiled parts where COMPILE is on),
                   captured by the warm-up; auto: STAC_CUDA_GRAPHS=0|1 in the server's environment
                   decides (off when unset: the graphs' static buffers stay held at any load)
  FP8              0 (default) | 1: torch runtime only: FP8 GEMMs for the blocks' linear layers (compute
                   capability 8.9+; refused elsewhere); STAC_FP8=1 also does
  RUNTIME          torch (default) | onnxruntime | tensorrt (the runtime registry of engine/runtime.py)
  ONNX_MODEL, ORT_THREADS, TRT_PLAN   options of the exported runtimes
Decoupled serving is not a parameter but the config's ``model_transaction_policy``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from ..protocol import IMAGE_SIZE_PARAMETER, PREPROCESS_PARAMETER, is_decoupled  # noqa: F401 - re-exported

DEFAULT_MAX_STREAMS = 16
DEFAULT_MAX_IMAGE_PIXELS = 518 * 518
DEFAULT_IDLE_TTL_S = 120.0
# Triton's own idle timeout is only a backstop: the model frees silent streams itself and ends their
# Triton sequence. Triton measures from a request's arrival, so queueing counts against its timeout;
# this margin keeps it from ever firing before the model's TTL on a slow server.
TRITON_IDLE_MARGIN_S = 600.0


@dataclass
class ServingLimits:
    """What ``StreamSessions`` enforces (derived from ``ServeSettings.limits()`` in a server)."""

    max_streams: int = DEFAULT_MAX_STREAMS
    max_cache_bytes: Optional[int] = None  # sum of per-stream memory bounds
    idle_ttl_s: float = DEFAULT_IDLE_TTL_S
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # per frame; larger requests are refused as oversized
    stream_keys: bool = False  # servers turn it on (ServeSettings.stream_keys); bare sessions trust callers


@dataclass
class ServeSettings:
    preset: str = "tiny"
    checkpoint: str = ""
    dtype: str = "float32"
    device: str = "auto"
    instance_kind: str = "KIND_CPU"  # KIND_GPU in production
    instance_count: int = 1
    cache_config: dict = field(default_factory=lambda: {"policy": "stac"})
    max_streams: int = DEFAULT_MAX_STREAMS
    max_cache_bytes: Optional[int] = None
    idle_ttl_s: float = DEFAULT_IDLE_TTL_S
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    # (height, width) every frame must have: Triton then refuses other sizes before the model sees them.
    frame_size: Optional[tuple[int, int]] = None
    stream_keys: bool = True
    max_batch_size: int = 16  # requests (streams) per execute()
    max_queue_delay_us: int = 2000
    # Triton's slots for live sequences; None: room for every admitted stream plus a batch of STARTs
    # being decided, so that a START is always seen by the model (which answers or refuses it at once).
    max_candidate_sequences: Optional[int] = None
    # Triton's idle timeout (a backstop, see TRITON_IDLE_MARGIN_S); never below idle_ttl_s + margin.
    triton_idle_us: Optional[int] = None
    strategy: str = "oldest"  # sequence batching strategy: "oldest" or "direct" (see docs/serving.md)
    runtime: str = "torch"  # a name of engine/runtime.py's registry
    compile: Optional[bool] = None  # COMPILE above (None: auto)
    cuda_graphs: Optional[bool] = None  # CUDA_GRAPHS above (None: auto)
    fp8: bool = False  # FP8 above
    onnx_model: str = ""  # RUNTIME=onnxruntime: path of the exported graph (relative to the model folder)
    ort_threads: int = 0
    output_dtype: str = "float32"  # or "float16": wire dtype of the dense per-pixel outputs
    output_device: str = "cpu"  # or "gpu": float outputs handed to Triton as CUDA tensors
    # Decoupled transaction policy: responses are sent by a thread of the model while the next batch
    # computes. Clients must use gRPC streaming.
    decoupled: bool = False
    warmup: str = ""  # WARMUP above; "" leaves it to the instance kind (on for GPU instances)
    # Published to clients (protocol.frame_spec): the width the model was trained at and VGGT's
    # preprocessing; 0 = not published (clients then need --size).
    image_size: int = 0
    preprocess: str = "crop"

    @classmethod
    def on_device(cls, device: str = "cpu", **fields: Any) -> "ServeSettings":
        """Settings for a local server on ``device`` ("cpu" or "cuda..."): the instance kind follows."""
        gpu = device.startswith("cuda")
        return cls(device="auto" if gpu else "cpu", instance_kind="KIND_GPU" if gpu else "KIND_CPU", **fields)

    def candidate_sequences(self) -> int:
        if self.max_candidate_sequences is not None:
            return self.max_candidate_sequences
        return max(64, 2 * self.max_streams + self.max_batch_size)

    def triton_idle_microseconds(self) -> int:
        return max(self.triton_idle_us or 0, int((self.idle_ttl_s + TRITON_IDLE_MARGIN_S) * 1e6))

    def limits(self) -> ServingLimits:
        return ServingLimits(max_streams=self.max_streams, max_cache_bytes=self.max_cache_bytes,
                             idle_ttl_s=self.idle_ttl_s, max_image_pixels=self.max_image_pixels,
                             stream_keys=self.stream_keys)

    def check(self) -> None:
        if self.strategy not in ("oldest", "direct"):
            raise ValueError(f"strategy must be 'oldest' or 'direct', got {self.strategy!r}")
        if self.output_dtype not in ("float32", "float16"):
            raise ValueError(f"output_dtype must be 'float32' or 'float16', got {self.output_dtype!r}")
        if self.output_device not in ("cpu", "gpu"):
            raise ValueError(f"output_device must be 'cpu' or 'gpu', got {self.output_device!r}")
        if self.output_device == "gpu" and self.instance_kind != "KIND_GPU":
            raise ValueError("output_device='gpu' needs a GPU instance (instance_kind='KIND_GPU')")
        if self.frame_size is not None and (len(self.frame_size) != 2 or min(self.frame_size) <= 0):
            raise ValueError(f"frame_size must be (height, width), got {self.frame_size!r}")


def to_parameters(s: ServeSettings) -> dict[str, str]:
    """The model-config parameters for ``s`` (optional ones only where they differ from the default)."""
    params = {
        "PRESET": s.preset,
        "CHECKPOINT": s.checkpoint,
        "DTYPE": s.dtype,
        "DEVICE": s.device,
        "CACHE_CONFIG": json.dumps(s.cache_config, sort_keys=True),
        "MAX_STREAMS": str(s.max_streams),
        "MAX_CACHE_BYTES": "" if s.max_cache_bytes is None else str(s.max_cache_bytes),
        "IDLE_TTL_S": f"{s.idle_ttl_s:g}",
        "MAX_IMAGE_PIXELS": str(s.max_image_pixels),
    }
    if not s.stream_keys:
        params["STREAM_KEYS"] = "0"
    if s.runtime != "torch":
        params.update({"RUNTIME": s.runtime, "ONNX_MODEL": s.onnx_model, "ORT_THREADS": str(s.ort_threads)})
    if s.compile is not None:
        params["COMPILE"] = "1" if s.compile else "0"
    if s.cuda_graphs is not None:
        params["CUDA_GRAPHS"] = "1" if s.cuda_graphs else "0"
    if s.fp8:
        params["FP8"] = "1"
    if s.output_dtype != "float32":
        params["OUTPUT_DTYPE"] = s.output_dtype
    if s.output_device != "cpu":
        params["OUTPUT_DEVICE"] = s.output_device
    if s.warmup:
        params["WARMUP"] = s.warmup
    if s.image_size:
        params.update({IMAGE_SIZE_PARAMETER: str(s.image_size), PREPROCESS_PARAMETER: s.preprocess})
    return params


def read_parameters(model_config: dict[str, Any]) -> dict[str, str]:
    """The raw string parameters of a model config (as JSON, the way Triton hands it to the model)."""
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def switch_or_auto(name: str, value: str) -> Optional[bool]:
    """A parameter that is on, off or auto (None)."""
    value = value.strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be auto, 0 or 1, got {value!r}")


def settings_from_config(model_config: dict[str, Any], instance_kind: str = "CPU") -> ServeSettings:
    """The settings a rendered model config carries (the inverse of ``render_config``)."""
    p = read_parameters(model_config)
    default = ServeSettings()

    def text(key: str, fallback: str) -> str:
        return (p.get(key, "") or fallback).strip()

    frames = next((i for i in model_config.get("input", []) if i.get("name") == "FRAMES"), {})
    dims = [int(d) for d in frames.get("dims", [])]
    frame_size = tuple(dims[-2:]) if len(dims) == 4 and min(dims[-2:]) > 0 else None
    stream_keys = text("STREAM_KEYS", "1").lower() not in ("0", "false", "no")
    s = dataclasses.replace(
        default,
        preset=p.get("PRESET", ""),  # empty: the checkpoint's own config (tiny without a checkpoint)
        checkpoint=text("CHECKPOINT", ""),
        dtype=text("DTYPE", default.dtype),
        device=text("DEVICE", default.device),
        instance_kind="KIND_GPU" if instance_kind.upper() in ("GPU", "KIND_GPU") else "KIND_CPU",
        cache_config=json.loads(text("CACHE_CONFIG", "{}")),
        max_streams=int(text("MAX_STREAMS", str(DEFAULT_MAX_STREAMS))),
        max_cache_bytes=int(p["MAX_CACHE_BYTES"]) if p.get("MAX_CACHE_BYTES") else None,
        idle_ttl_s=float(text("IDLE_TTL_S", str(DEFAULT_IDLE_TTL_S))),
        max_image_pixels=int(text("MAX_IMAGE_PIXELS", str(DEFAULT_MAX_IMAGE_PIXELS))),
        frame_size=frame_size,
        stream_keys=stream_keys,
        runtime=text("RUNTIME", "torch").lower(),
        compile=switch_or_auto("COMPILE", text("COMPILE", "auto")),
        cuda_graphs=switch_or_auto("CUDA_GRAPHS", text("CUDA_GRAPHS", "auto")),
        fp8=text("FP8", "0").lower() in ("1", "true", "yes", "on"),
        onnx_model=text("ONNX_MODEL", ""),
        ort_threads=int(text("ORT_THREADS", "0")),
        output_dtype=text("OUTPUT_DTYPE", "float32").lower(),
        output_device=text("OUTPUT_DEVICE", "cpu").lower(),
        decoupled=is_decoupled(model_config),
        warmup=text("WARMUP", ""),
        image_size=int(text(IMAGE_SIZE_PARAMETER, "0")),
        preprocess=text(PREPROCESS_PARAMETER, "crop"),
    )
    if s.output_dtype not in ("float32", "float16"):
        raise ValueError(f"OUTPUT_DTYPE must be one of ['float16', 'float32'], got {s.output_dtype!r}")
    if s.output_device not in ("cpu", "gpu"):
        raise ValueError(f"OUTPUT_DEVICE must be 'cpu' or 'gpu', got {s.output_device!r}")
    if s.output_device == "gpu" and s.instance_kind != "KIND_GPU":
        raise ValueError(f"OUTPUT_DEVICE=gpu needs a KIND_GPU instance, this one is {instance_kind}")
    return s

