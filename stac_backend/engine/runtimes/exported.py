"""What a stream running an exported step graph does regardless of the runtime (ONNX Runtime or
TensorRT): frame checks against the graph's fixed size and state capacity, stream bookkeeping,
batching of same-shaped chunks, and the ``stream.cache`` view serving reads.

The runtimes differ only in how the state is held (numpy arrays / device tensors) and how one
batched call runs; those parts stay in ``ort_runtime.py`` and ``trt_runtime.py``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..engine.frames import FrameInput, to_frame_tensor
from ..engine.runtime import RuntimeStream
from .layout import StepLayout


class StateView:
    """What serving asks of ``stream.cache``: a memory bound and stats."""

    def __init__(self, stream: "ExportedStream"):
        self._stream = stream

    def bytes_bound(self, tokens_per_frame: int) -> int:
        return self._stream.step.layout.state_bytes()

    def memory_bytes(self) -> int:
        return self._stream.memory_bytes()

    def stats(self) -> dict:
        s = self._stream
        out = {"memory_bytes": s.memory_bytes(), "frames_seen": s.frames_seen}
        if s.state is not None:
            state = {k: np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in s.state.items()
                     if k in ("hot_len", "kv_len", "pool_row_key", "ret_valid")}
            for key in ("hot_len", "kv_len"):
                if key in state:
                    out["tokens_per_head"] = int(state[key].reshape(-1)[0])
            if "pool_row_key" in state:
                out["pool_voxels"] = int((state["pool_row_key"] >= 0).sum())
                out["retrieved_per_head"] = int(state["ret_valid"].sum(axis=-1).max())
        return out

    def reset(self) -> None:
        self._stream.reset()


class ExportedStream(RuntimeStream):
    """One camera stream over an exported step (API of ``engine.Stream``); subclasses hold the
    state in their runtime's form and say how many bytes it takes."""

    def __init__(self, step, device: torch.device):
        self.step = step
        self.chunk_size = step.layout.max_chunk
        self.state: Optional[dict] = None
        self.frames_seen = 0
        self.image_hw: Optional[tuple[int, int]] = None
        self.broken: Optional[str] = None
        self.cache = StateView(self)
        self.device, self.dtype = device, torch.float32

    @property
    def layout(self) -> StepLayout:
        return self.step.layout

    @property
    def config(self):
        return self.layout.model

    def validate(self, frames: FrameInput) -> Tensor:
        """Checked float frames [C, 3, H, W] on the stream's device; raises ValueError naming the
        problem (stream untouched)."""
        if self.broken is not None:
            raise RuntimeError(f"stream is unusable after an earlier failure ({self.broken}); reset it or open a new one")
        lay = self.layout
        images = to_frame_tensor(frames, lay.model.patch_size, self.chunk_size, self.image_hw, device=self.device,
                                 dtype=torch.float32)
        if tuple(images.shape[-2:]) != (lay.height, lay.width):
            raise ValueError(f"this exported graph takes {lay.height}x{lay.width} frames, got "
                             f"{images.shape[-2]}x{images.shape[-1]}")
        capacity = lay.frames_capacity()
        if capacity is not None and self.frames_seen + images.shape[0] > capacity:
            raise ValueError(f"stream budget exhausted: the {lay.policy} state holds {capacity} frames, "
                             f"{self.frames_seen} seen, {images.shape[0]} more pushed")
        return images

    def memory_bytes(self) -> int:
        raise NotImplementedError

    def memory_bound(self, image_hw: Optional[tuple[int, int]] = None) -> Optional[int]:
        return self.layout.state_bytes()

    def advance(self, state: dict, out: dict[str, Tensor], images: Tensor) -> dict[str, Tensor]:
        """Take a successful step's new state; number its frames; returns ``out``."""
        count = images.shape[0]
        self.state = state
        out["frame_index"] = torch.arange(self.frames_seen, self.frames_seen + count)
        self.image_hw = tuple(images.shape[-2:])
        self.frames_seen += count
        return out

    def reset(self) -> None:
        self.state = None
        self.frames_seen = 0
        self.image_hw = None
        self.broken = None

    close = reset


def batch_groups(streams: Sequence[ExportedStream], images: Sequence[Tensor]) -> list[list[int]]:
    """Indices of the streams that run as one call: same step, same chunk shape, at most the
    step's ``max_batch`` (None or 0: any number) per call."""
    groups: dict[tuple, list[int]] = {}
    for i, (s, frames) in enumerate(zip(streams, images)):
        groups.setdefault((id(s.step), tuple(frames.shape)), []).append(i)
    calls = []
    for members in groups.values():
        size = streams[members[0]].step.max_batch or len(members)
        calls.extend(members[start : start + size] for start in range(0, len(members), size))
    return calls
