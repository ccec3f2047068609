"""Streams that run the exported step graph with ONNX Runtime (CPU) instead of torch.

    step = OnnxStep("stac_step.onnx")                 # one session, shared by many streams
    stream = OnnxRuntimeStream(step)
    out = stream.push(frames)                          # like engine.Stream.push: dict of [C, ...] tensors
    stream.memory_bytes()                              # the state it holds (fixed budgets, allocated up front)

A stream owns its state tensors (``StepLayout``); each push feeds them to the graph with the frames
and keeps the new state the graph returns. Frames are validated exactly like ``engine.Stream``
does (``to_frame_tensor``), plus the graph's fixed frame size and, for budgets counted in frames
(``full``), the stream length. ``push_many`` runs several streams as one batched call when their
chunks have the same size (the graph's batch axis).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..engine.frames import FrameInput, to_frame_tensor
from .layout import OUTPUTS, StepLayout
from .onnx_export import input_names, output_names, read_layout


class OnnxStep:
    """An ONNX Runtime session over an exported step graph, with its layout."""

    def __init__(self, path: Union[str, Path], threads: int = 0, providers: Optional[Sequence[str]] = None,
                 low_memory: bool = False):
        import onnxruntime as ort

        from .ort_ops import prepare_model, session_options

        self.path = Path(path)
        self.layout: StepLayout = read_layout(self.path)
        self.session = ort.InferenceSession(prepare_model(self.path), session_options(threads, low_memory),
                                            providers=list(providers or ["CPUExecutionProvider"]))
        names = [i.name for i in self.session.get_inputs()]
        if names != input_names(self.layout):
            raise ValueError(f"{self.path}: graph inputs {names} do not match its layout")
        self.state_names = self.layout.state_names()
        self._outputs = output_names(self.layout)
        self._lock = threading.Lock()  # one run at a time per session object (the Python ops hold the GIL anyway)
        batch_dim = self.session.get_inputs()[0].shape[0]
        self.max_batch = None if isinstance(batch_dim, str) else int(batch_dim)

    @property
    def config(self):
        """The model configuration (what ``engine.Stream.config`` is)."""
        return self.layout.model

    def run(self, images: np.ndarray, frame_offset: np.ndarray, state: dict[str, np.ndarray]) -> tuple[dict, dict]:
        feeds = {"images": images, "frame_offset": frame_offset}
        feeds.update({"in_" + n: state[n] for n in self.state_names})
        with self._lock:
            values = self.session.run(self._outputs, feeds)
        outs = dict(zip(OUTPUTS, values[: len(OUTPUTS)]))
        new = dict(zip(self.state_names, values[len(OUTPUTS):]))
        return outs, new


class StateView:
    """What serving asks of ``stream.cache``: a memory bound and stats."""

    def __init__(self, stream: "OnnxRuntimeStream"):
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


class OnnxRuntimeStream:
    """One camera stream whose steps run the exported graph (same API as ``engine.Stream``)."""

    def __init__(self, step: Union[OnnxStep, str, Path]):
        self.step = step if isinstance(step, OnnxStep) else OnnxStep(step)
        self.chunk_size = self.step.layout.max_chunk
        self.state: Optional[dict[str, np.ndarray]] = None
        self.frames_seen = 0
        self.image_hw: Optional[tuple[int, int]] = None
        self.broken: Optional[str] = None
        self.cache = StateView(self)
        self.device, self.dtype = torch.device("cpu"), torch.float32

    @property
    def config(self):
        return self.step.layout.model

    @property
    def layout(self) -> StepLayout:
        return self.step.layout

    def validate(self, frames: FrameInput) -> Tensor:
        """Checked float frames [C, 3, H, W]; raises ValueError naming the problem (stream untouched)."""
        if self.broken is not None:
            raise RuntimeError(f"stream is unusable after an earlier failure ({self.broken}); reset it or open a new one")
        lay = self.layout
        images = to_frame_tensor(frames, lay.model.patch_size, self.chunk_size, self.image_hw, dtype=torch.float32)
        if tuple(images.shape[-2:]) != (lay.height, lay.width):
            raise ValueError(f"this exported graph takes {lay.height}x{lay.width} frames, got "
                             f"{images.shape[-2]}x{images.shape[-1]}")
        capacity = lay.frames_capacity()
        if capacity is not None and self.frames_seen + images.shape[0] > capacity:
            raise ValueError(f"stream budget exhausted: the {lay.policy} state holds {capacity} frames, "
                             f"{self.frames_seen} seen, {images.shape[0]} more pushed")
        return images

    def push(self, frames: FrameInput) -> dict[str, Tensor]:
        return push_many([self], [self.validate(frames)])[0]

    def memory_bytes(self) -> int:
        return 0 if self.state is None else int(sum(a.nbytes for a in self.state.values()))

    def memory_bound(self) -> Optional[int]:
        return self.layout.state_bytes()

    def reset(self) -> None:
        self.state = None
        self.frames_seen = 0
        self.image_hw = None
        self.broken = None

    close = reset

    def _ensure_state(self) -> dict[str, np.ndarray]:
        if self.state is None:
            self.state = {k: v.numpy() for k, v in self.layout.empty_state(1).items()}
        return self.state


def push_many(streams: Sequence[OnnxRuntimeStream], images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
    """One step for several streams (frames already validated). Streams sharing a graph and a
    chunk size run as one batched call. A stream's state changes only when its call succeeded, so
    a failure leaves every stream as it was (none is ever marked broken)."""
    results: list[Optional[dict[str, Tensor]]] = [None] * len(streams)
    groups: dict[tuple, list[int]] = {}
    for i, (s, frames) in enumerate(zip(streams, images)):
        groups.setdefault((id(s.step), tuple(frames.shape)), []).append(i)
    for members in groups.values():
        step = streams[members[0]].step
        size = step.max_batch or len(members)
        for start in range(0, len(members), size):
            part = members[start : start + size]
            group = [streams[i] for i in part]
            outs = _run(step, group, [images[i] for i in part])
            for i, out in zip(part, outs):
                results[i] = out
    return results  # type: ignore[return-value]


def _run(step: OnnxStep, streams: list[OnnxRuntimeStream], images: list[Tensor]) -> list[dict[str, Tensor]]:
    batch = np.stack([f.numpy() for f in images]).astype(np.float32, copy=False)
    offsets = np.array([s.frames_seen for s in streams], dtype=np.int64)
    states = [s._ensure_state() for s in streams]
    state = {n: np.concatenate([st[n] for st in states]) for n in step.state_names}
    outs, new = step.run(batch, offsets, state)
    results = []
    for b, s in enumerate(streams):
        s.state = {n: np.ascontiguousarray(new[n][b : b + 1]) for n in step.state_names}
        count = images[b].shape[0]
        out = {name: torch.from_numpy(np.ascontiguousarray(outs[name][b])) for name in OUTPUTS}
        out["frame_index"] = torch.arange(s.frames_seen, s.frames_seen + count)
        s.image_hw = tuple(images[b].shape[-2:])
        s.frames_seen += count
        results.append(out)
    return results


class OnnxRuntimeEngine:
    """What ``serving.sessions.StreamSessions`` needs to serve streams with the exported graph."""

    def __init__(self, step: OnnxStep):
        self.step = step

    @property
    def cache_config(self):
        return self.step.layout.cache

    def new_stream(self) -> OnnxRuntimeStream:
        return OnnxRuntimeStream(self.step)

    @staticmethod
    def push_many(streams, images):
        return push_many(streams, images)

    @classmethod
    def from_parameters(cls, params: dict[str, str], model_dir: Optional[str]) -> "OnnxRuntimeEngine":
        """From Triton model-config parameters: ONNX_MODEL (path, relative to the model folder),
        ORT_THREADS (intra-op threads, 0 = default). CACHE_CONFIG, when given, must equal the
        cache configuration the graph was exported with (the graph fixes it)."""
        import json

        from ..cache import CacheConfig

        onnx_model = params.get("ONNX_MODEL", "")
        if not onnx_model:
            raise ValueError("RUNTIME=onnxruntime needs the ONNX_MODEL parameter (an exported step graph, "
                             "python -m stac_backend.export)")
        path = Path(onnx_model)
        if not path.is_absolute() and model_dir:
            path = Path(model_dir) / path
        if not path.is_file():
            raise ValueError(f"ONNX_MODEL {path} not found")
        step = OnnxStep(path, threads=int(params.get("ORT_THREADS", "0") or 0))
        configured = params.get("CACHE_CONFIG", "")
        if configured:
            wanted = CacheConfig.from_dict(json.loads(configured))
            if wanted != step.layout.cache:
                raise ValueError(f"CACHE_CONFIG {wanted} differs from the cache configuration {path.name} was exported "
                                 f"with ({step.layout.cache}); re-export or fix the parameter")
        return cls(step)
