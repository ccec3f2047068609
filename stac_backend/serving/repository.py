"""Writing Triton model repositories for the ``stac`` model.

The checked-in ``model_repository/stac`` (production: GPU, bf16) and the repositories ``stac
serve`` writes for local runs come from the same ``render_config`` so they cannot drift apart.

Model-config parameters read by the model (all strings):
  PRESET           model preset (tiny, vggt-1b); empty = the checkpoint's own config
  CHECKPOINT       weights file, absolute or relative to the model's folder (<repo>/stac); empty = random weights
  DTYPE            float32 | bfloat16 | float16
  DEVICE           auto (GPU instance -> its GPU, else CPU) | cpu | cuda:N
  CACHE_CONFIG     JSON of CacheConfig fields (policy, window, hh, memory_budget_bytes, ...)
  MAX_STREAMS      live streams per model instance
  MAX_CACHE_BYTES  cap on the sum of live streams' memory bounds (empty = none)
  IDLE_TTL_S       seconds before an idle stream is freed (never less than Triton's idle timeout)
  IMAGE_SIZE       for clients: the frame width the model was trained at (frames are RGB uint8)
  PREPROCESS       for clients: crop | pad, VGGT's preprocessing to IMAGE_SIZE (stac_backend.protocol)
  MAX_IMAGE_PIXELS frames larger than this (H * W) are refused as oversized
  OUTPUT_DTYPE     float32 (default) | float16: wire dtype of DEPTH, DEPTH_CONF, WORLD_POINTS,
                   WORLD_POINTS_CONF (the outputs' data_type follows); written only when float16
  OUTPUT_DEVICE    cpu (default) | gpu: where the float outputs are handed to Triton. gpu (GPU
                   instances only): as CUDA tensors, which the Python backend passes by CUDA IPC
                   and Triton copies into the response, instead of a host copy here plus a copy
                   into the backend's shared memory; written only when gpu
  (decoupled: not a parameter but the config's model_transaction_policy, written only when true;
   the model then sends responses from a thread of its own and clients must stream, see
   serving/triton_model.py)
  WARMUP           on (392x518) | off | HEIGHTxWIDTH[,...]: warm the runtime up at these frame sizes
                   before serving (every kernel once, step memory measured); unset: on for GPU instances
  RUNTIME          torch (default: the engine) | onnxruntime (the exported step graph, CPU; issue #6)
  ONNX_MODEL       RUNTIME=onnxruntime: the exported graph, absolute or relative to the model's folder
  ORT_THREADS      RUNTIME=onnxruntime: intra-op threads (0 = ONNX Runtime's default)
                   (RUNTIME=tensorrt + TRT_PLAN: a TensorRT engine of the graph, GPU; not exercised here)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..protocol import IMAGE_SIZE_PARAMETER, MODEL_NAME, PREPROCESS_PARAMETER, is_decoupled  # noqa: F401 - re-exported

DENSE_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}  # ServeSettings.output_dtype -> data_type
SHIM = '''"""Triton entry point: the logic lives in stac_backend.serving.triton_model."""

from stac_backend.serving.triton_model import TritonPythonModel  # noqa: F401
'''


@dataclass
class ServeSettings:
    preset: str = "tiny"
    checkpoint: str = ""
    dtype: str = "float32"
    device: str = "auto"
    instance_kind: str = "KIND_CPU"  # KIND_GPU in production
    instance_count: int = 1
    cache_config: dict = field(default_factory=lambda: {"policy": "stac"})
    max_streams: int = 16
    max_cache_bytes: Optional[int] = None
    idle_ttl_s: float = 120.0
    max_image_pixels: int = 518 * 518
    max_batch_size: int = 16  # requests (streams) per execute()
    max_queue_delay_us: int = 2000
    max_candidate_sequences: int = 64
    triton_idle_us: int = 120_000_000
    strategy: str = "oldest"  # sequence batching strategy: "oldest" or "direct" (see docs/serving.md)
    runtime: str = "torch"  # "torch" or "onnxruntime" (the exported step graph; docs/export.md)
    onnx_model: str = ""  # RUNTIME=onnxruntime: path of the exported graph (relative to the model folder)
    ort_threads: int = 0
    # "float32" or "float16": wire dtype of the dense per-pixel outputs (DEPTH, DEPTH_CONF, WORLD_POINTS,
    # WORLD_POINTS_CONF); float16 halves their bytes (docs/serving.md). Poses stay float32.
    output_dtype: str = "float32"
    # "cpu" or "gpu": where the float outputs are handed to Triton (OUTPUT_DEVICE above).
    output_device: str = "cpu"
    # Decoupled transaction policy: execute() returns once a batch's outputs are on the host and a
    # sender thread sends the responses while the next batch computes. Clients must use gRPC
    # streaming (StacClient and the fleet detect it; perf_analyzer needs --streaming).
    decoupled: bool = False
    warmup: str = ""  # WARMUP above; "" leaves it to the instance kind (on for GPU instances)
    # Published to clients (protocol.frame_spec): the width the model was trained at and VGGT's
    # preprocessing; 0 = not published (clients then need --size).
    image_size: int = 0
    preprocess: str = "crop"


def render_config(s: ServeSettings) -> str:
    if s.strategy not in ("oldest", "direct"):
        raise ValueError(f"strategy must be 'oldest' or 'direct', got {s.strategy!r}")
    if s.output_dtype not in DENSE_TYPES:
        raise ValueError(f"output_dtype must be 'float32' or 'float16', got {s.output_dtype!r}")
    if s.output_device not in ("cpu", "gpu"):
        raise ValueError(f"output_device must be 'cpu' or 'gpu', got {s.output_device!r}")
    if s.output_device == "gpu" and s.instance_kind != "KIND_GPU":
        raise ValueError("output_device='gpu' needs a GPU instance (instance_kind='KIND_GPU')")
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
    if s.runtime != "torch":  # the torch default renders exactly as before
        params.update({"RUNTIME": s.runtime, "ONNX_MODEL": s.onnx_model, "ORT_THREADS": str(s.ort_threads)})
    if s.output_dtype != "float32":  # likewise: the float32 default renders exactly as before
        params["OUTPUT_DTYPE"] = s.output_dtype
    if s.output_device != "cpu":
        params["OUTPUT_DEVICE"] = s.output_device
    if s.warmup:
        params["WARMUP"] = s.warmup
    if s.image_size:
        params.update({IMAGE_SIZE_PARAMETER: str(s.image_size), PREPROCESS_PARAMETER: s.preprocess})
    parameters = "\n".join(
        f'parameters: {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}' for k, v in params.items()
    )
    dense = DENSE_TYPES[s.output_dtype]  # must match what the model sends (it checks at load)
    outputs = [
        ("DEPTH", dense, "[ -1, -1, -1 ]"),
        ("DEPTH_CONF", dense, "[ -1, -1, -1 ]"),
        ("WORLD_POINTS", dense, "[ -1, -1, -1, 3 ]"),
        ("WORLD_POINTS_CONF", dense, "[ -1, -1, -1 ]"),
        ("POSE_ENC", "TYPE_FP32", "[ -1, 9 ]"),
        ("EXTRINSICS", "TYPE_FP32", "[ -1, 3, 4 ]"),
        ("INTRINSICS", "TYPE_FP32", "[ -1, 3, 3 ]"),
        ("FRAME_INDEX", "TYPE_INT64", "[ -1 ]"),
        ("CACHE_BYTES", "TYPE_INT64", "[ 1 ]"),
    ]
    if s.strategy == "oldest":
        strategy = (
            f"  oldest {{\n    max_candidate_sequences: {s.max_candidate_sequences}\n"
            f"    preferred_batch_size: [ {s.max_batch_size} ]\n"
            f"    max_queue_delay_microseconds: {s.max_queue_delay_us}\n  }}"
        )
        ready = ""
    else:  # direct: one batch slot per live sequence; idle slots arrive as null requests (READY = 0)
        strategy = f"  direct {{ max_queue_delay_microseconds: {s.max_queue_delay_us} }}"
        ready = '\n    { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] } ] },'
    output_text = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: {d} }}' for n, t, d in outputs)
    # only when set, so the default renders exactly as before
    transaction = "\nmodel_transaction_policy { decoupled: true }\n" if s.decoupled else ""
    return f"""# Generated by stac_backend.serving.repository.render_config - edit the settings, not this file.
# One sequence (correlation id) per camera stream. Requests of different streams are batched by
# the "oldest" strategy; the model runs them as one batched forward per chunk shape.
name: "{MODEL_NAME}"
backend: "python"
max_batch_size: {s.max_batch_size}

input [
  {{
    # uint8 frames: [frames, 3, H, W] per request (plus Triton's batch dim of 1)
    name: "FRAMES"
    data_type: TYPE_UINT8
    dims: [ -1, 3, -1, -1 ]
    allow_ragged_batch: true
  }}
]
output [
{output_text}
]

sequence_batching {{
  # Explicit: unset would mean 1 s. Triton frees idle sequences silently; the model also expires
  # its own per-stream state after IDLE_TTL_S (never shorter than this).
  max_sequence_idle_microseconds: {s.triton_idle_us}
{strategy}
  control_input [
    {{ name: "START" control [ {{ kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] }} ] }},{ready}
    {{ name: "END" control [ {{ kind: CONTROL_SEQUENCE_END int32_false_true: [ 0, 1 ] }} ] }},
    {{ name: "CORRID" control [ {{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 }} ] }}
  ]
}}

instance_group [ {{ count: {s.instance_count} kind: {s.instance_kind} }} ]
{transaction}
{parameters}
"""


def write_repository(
    root: Path, settings: ServeSettings, checkpoint_file: Optional[Path] = None, onnx_file: Optional[Path] = None
) -> Path:
    """Write ``root/stac/{config.pbtxt, 1/model.py}``; optionally copy a checkpoint (and an exported
    ONNX step graph, with its external data, for RUNTIME=onnxruntime) beside it."""
    model_dir = Path(root) / MODEL_NAME
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    if onnx_file is not None:
        target = model_dir / "onnx" / Path(onnx_file).name
        target.parent.mkdir(exist_ok=True)
        for src in (Path(onnx_file), Path(str(onnx_file) + ".data")):
            dst = target.parent / src.name
            if src.is_file() and src.resolve() != dst.resolve():
                shutil.copy2(src, dst)
        settings.onnx_model = str(target.relative_to(model_dir))
    if checkpoint_file is not None:
        target = model_dir / "checkpoints" / Path(checkpoint_file).name
        target.parent.mkdir(exist_ok=True)
        if Path(checkpoint_file).resolve() != target.resolve():
            shutil.copy2(checkpoint_file, target)
        settings.checkpoint = str(target.relative_to(model_dir))
    (model_dir / "config.pbtxt").write_text(render_config(settings))
    (model_dir / "1" / "model.py").write_text(SHIM)
    return Path(root)


# The checked-in production repository (model_repository/stac): GPU instance, bf16, STAC policy,
# the vggt-1b checkpoint placed by the deployment's prepare step. Outputs go through the host
# (OUTPUT_DEVICE=gpu is bit-identical but measured no faster, docs/performance.md).
PRODUCTION = ServeSettings(
    preset="vggt-1b",
    checkpoint="checkpoints/vggt-1b.safetensors",
    dtype="bfloat16",
    device="auto",
    instance_kind="KIND_GPU",
    cache_config={"policy": "stac"},
    max_streams=8,
    idle_ttl_s=120.0,
    max_batch_size=8,
    image_size=518,
)


def local_server(settings: ServeSettings, workdir: Path, checkpoint_file: Optional[Path] = None, **server_options):
    """A (not yet started) ``TritonServer`` for a repository written from ``settings`` under ``workdir``.

    The one place that launches the stac repository locally (``stac serve``/``demo``, the fleet and
    benchmarks): the stac model moves tensors only through DLPack, so the launcher's numpy-2
    refusal does not apply to it. ``server_options`` go to ``TritonServer`` (ports, logs, env, ...).
    """
    from ..tools.tritonserver import TritonServer

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    repo = write_repository(workdir / "model_repository", settings, checkpoint_file=checkpoint_file)
    return TritonServer(repo, log_file=workdir / "tritonserver.log", check_numpy=False, **server_options)
