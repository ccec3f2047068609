"""Streams and steps: chunked streaming over a model with per-stream cache policies."""

from .frames import to_frame_tensor
from .stream import Stream, full_cache_bytes_per_frame, push_many

__all__ = ["Stream", "full_cache_bytes_per_frame", "push_many", "to_frame_tensor"]
