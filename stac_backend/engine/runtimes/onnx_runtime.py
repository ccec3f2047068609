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

from ..engine.frames import FrameInput
from ..engine.runtime import Runtime
from .exported_stream import ExportedStream, StateView, batch_groups  # noqa: F401 - StateView re-exported
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


class OnnxRuntimeStream(ExportedStream):
    """One camera stream whose steps run the exported graph; its state lives in numpy arrays."""

    def __init__(self, step: Union[OnnxStep, str, Path]):
        super().__init__(step if isinstance(step, OnnxStep) else OnnxStep(step), torch.device("cpu"))

    def push(self, frames: FrameInput) -> dict[str, Tensor]:
        return push_many([self], [self.validate(frames)])[0]

    def memory_bytes(self) -> int:
        return 0 if self.state is None else int(sum(a.nbytes for a in self.state.values()))

    def _ensure_state(self) -> dict[str, np.ndarray]:
        if self.state is None:
            self.state = {k: v.numpy() for k, v in self.layout.empty_state(1).items()}
        return self.state


def push_many(streams: Sequence[OnnxRuntimeStream], images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
    """One step for several streams (frames already validated). Streams sharing a graph and a
    chunk size run as one batched call. A stream's state changes only when its call succeeded, so
    a failure leaves every stream as it was (none is ever marked broken)."""
    results: list[Optional[dict[str, Tensor]]] = [None] * len(streams)
    for part in batch_groups(streams, images):
        step = streams[part[0]].step
        group = [streams[i] for i in part]
        batch = np.stack([images[i].numpy() for i in part]).astype(np.float32, copy=False)
        offsets = np.array([s.frames_seen for s in group], dtype=np.int64)
        states = [s._ensure_state() for s in group]
        state = {n: np.concatenate([st[n] for st in states]) for n in step.state_names}
        outs, new = step.run(batch, offsets, state)
        for b, (i, s) in enumerate(zip(part, group)):
            out = {name: torch.from_numpy(np.ascontiguousarray(outs[name][b])) for name in OUTPUTS}
            results[i] = s.advance({n: np.ascontiguousarray(new[n][b : b + 1]) for n in step.state_names}, out, images[i])
    return results  # type: ignore[return-value]


class OnnxRuntimeEngine(Runtime):
    """What ``serving.sessions.StreamSessions`` needs to serve streams with the exported graph."""

    name = "onnxruntime"

    def __init__(self, step: OnnxStep):
        self.graph = step

    @property
    def cache_config(self):
        return self.graph.layout.cache

    def open_stream(self) -> OnnxRuntimeStream:
        return OnnxRuntimeStream(self.graph)

    def step(self, streams, images):
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
