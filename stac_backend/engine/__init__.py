"""Streams and steps: chunked streaming over a model with per-stream cache policies, and the
runtime interface that serving uses (torch engine, ONNX Runtime, TensorRT)."""

from .frames import to_frame_tensor
from .runtime import Runtime, RuntimeStream, make_runtime, register_runtime, runtime_names
from .stream import (Stream, cache_geometry, full_cache_bytes_per_frame, geometry_of, push_many, stream_memory_bound,
                     stream_resting_memory_bound)
from .admission import admission_reserve_bytes, streams_that_fit

__all__ = [
    "Runtime",
    "admission_reserve_bytes",
    "RuntimeStream",
    "Stream",
    "cache_geometry",
    "full_cache_bytes_per_frame",
    "geometry_of",
    "make_runtime",
    "push_many",
    "register_runtime",
    "runtime_names",
    "stream_memory_bound",
    "stream_resting_memory_bound",
    "streams_that_fit",
    "to_frame_tensor",
]
