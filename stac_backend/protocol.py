"""The wire contract of the ``stac`` Triton model, shared by the client and the server.

Torch-free on purpose (numpy and the standard library only): a camera-side client installs with
``pip install stac-backend[client]`` (tritonclient + numpy) and imports this module, the client and
nothing of the engine. docs/serving.md explains every convention in words.

- One request = one chunk of one camera stream: input ``FRAMES`` uint8 ``[1, C, 3, H, W]`` (RGB,
  channel-first, 0..255; Triton's batch dimension of 1 in front), C <= the chunk size (4).
- One camera stream = one Triton sequence: ``sequence_id`` = the stream id, START on its first
  chunk, END on its last. The id also travels as the ``x-stream-id`` header so that a proxy in front
  of several replicas keeps a stream on one of them.
- The frame size the model was trained at and the preprocessing it expects are published as
  model-config parameters (``IMAGE_SIZE``, ``PREPROCESS``, ``COLOR_ORDER``): :func:`frame_spec`.
- A model with the decoupled transaction policy answers gRPC streams only: :func:`is_decoupled` is
  the one place that decides it, for the client, the load generator, perf_analyzer's helper and the
  server itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np

MODEL_NAME = "stac"
INPUT_NAME = "FRAMES"
INPUT_DATATYPE = "UINT8"  # Triton's name for the wire dtype of FRAMES
STREAM_ID_HEADER = "x-stream-id"
DEFAULT_CHUNK = 4  # frames per request the server's engine steps at once (the STAC reference setting)

# Output name on the wire -> key in the dicts the client returns.
OUTPUT_KEYS = {
    "DEPTH": "depth",
    "DEPTH_CONF": "depth_conf",
    "WORLD_POINTS": "world_points",
    "WORLD_POINTS_CONF": "world_points_conf",
    "POSE_ENC": "pose_enc",
    "EXTRINSICS": "extrinsics",
    "INTRINSICS": "intrinsics",
    "FRAME_INDEX": "frame_index",
    "CACHE_BYTES": "cache_bytes",
}
# The per-pixel outputs: float32, or float16 from a server with OUTPUT_DTYPE=float16.
DENSE_OUTPUTS = ("DEPTH", "DEPTH_CONF", "WORLD_POINTS", "WORLD_POINTS_CONF")

# Model-config parameters that describe the frames the model expects (written by the repository
# renderer, read by clients through get_model_config).
# The secret a stream is bound to (docs/security.md): [1, 2] int64 (128 random bits) the client draws
# at START and sends with every chunk; a START without one gets one drawn by the server in its answer.
STREAM_KEY_INPUT = "STREAM_KEY"
IMAGE_SIZE_PARAMETER = "IMAGE_SIZE"
PREPROCESS_PARAMETER = "PREPROCESS"
COLOR_ORDER_PARAMETER = "COLOR_ORDER"
PATCH_SIZE = 14  # H and W must be multiples of the ViT patch size


@dataclass(frozen=True)
class FrameSpec:
    """What a server's model expects: ``size`` is the target width in pixels (0 = not published),
    ``preprocess`` VGGT's ``crop`` (resize to ``size`` wide, centre-crop the height to <= ``size``)
    or ``pad`` (resize the long side to ``size``, pad to a square), ``color_order`` RGB."""

    size: int = 0
    preprocess: str = "crop"
    color_order: str = "RGB"


def config_of(reply: Mapping[str, Any]) -> Mapping[str, Any]:
    """The model config inside a ``get_model_config(..., as_json=True)`` reply (``{"config": {...}}``),
    or the config itself when given one (``config.pbtxt`` as Triton hands it to the model)."""
    inner = reply.get("config")
    return inner if isinstance(inner, Mapping) else reply


def is_decoupled(model_config: Mapping[str, Any]) -> bool:
    """Whether a model config (or a client's config reply) sets the decoupled transaction policy;
    such a model answers gRPC streams only."""
    return bool(config_of(model_config).get("model_transaction_policy", {}).get("decoupled", False))


def parameters(model_config: Mapping[str, Any]) -> dict[str, str]:
    """The config's ``parameters`` as plain strings."""
    raw = config_of(model_config).get("parameters", {}) or {}
    return {key: str(value.get("string_value", "")) if isinstance(value, Mapping) else str(value)
            for key, value in raw.items()}


def frame_spec(model_config: Mapping[str, Any]) -> FrameSpec:
    """The frame size and preprocessing a served model publishes (:class:`FrameSpec`)."""
    params = parameters(model_config)
    size = params.get(IMAGE_SIZE_PARAMETER, "") or "0"
    return FrameSpec(size=int(size), preprocess=params.get(PREPROCESS_PARAMETER, "") or "crop",
                     color_order=params.get(COLOR_ORDER_PARAMETER, "") or "RGB")


def to_uint8_frames(frames) -> np.ndarray:
    """Frames ``[C, 3, H, W]`` as contiguous uint8, from uint8 or float-in-[0, 1] arrays (or torch
    tensors, read without importing torch). Floats round to the nearest of 0..255: exactly what a
    served stream receives, and what ``stac stream`` feeds in-process too, so both agree."""
    if hasattr(frames, "detach"):  # a torch tensor
        frames = frames.detach().cpu()
        if str(frames.dtype) in ("torch.bfloat16", "torch.float16"):
            frames = frames.float()
        frames = frames.numpy()
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return np.ascontiguousarray(frames)
    if not np.issubdtype(frames.dtype, np.floating):
        raise ValueError(f"frames must be uint8 (0..255) or float (0..1), got {frames.dtype}")
    return np.ascontiguousarray((np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def check_chunk(frames: np.ndarray, chunk: Optional[int] = None) -> None:
    """Refuse on the client what the server would refuse: wrong rank, channels, or sizes."""
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"a chunk is [frames, 3, H, W] (RGB, channel-first), got shape {list(frames.shape)}")
    if frames.shape[0] == 0 or (chunk is not None and frames.shape[0] > chunk):
        raise ValueError(f"a chunk holds 1..{chunk or 'N'} frames, got {frames.shape[0]}")
    h, w = frames.shape[2:]
    if h % PATCH_SIZE or w % PATCH_SIZE:
        raise ValueError(f"frame size {w}x{h} is not a multiple of {PATCH_SIZE} (preprocess with crop or pad)")


def frames_input(grpc, frames: np.ndarray):
    """The ``FRAMES`` input of one request (``grpc``: ``tritonclient.grpc``, passed in so that this
    module imports no client library): uint8 ``[1, C, 3, H, W]``."""
    data = to_uint8_frames(frames)[None]
    tensor = grpc.InferInput(INPUT_NAME, list(data.shape), INPUT_DATATYPE)
    tensor.set_data_from_numpy(data)
    return tensor
