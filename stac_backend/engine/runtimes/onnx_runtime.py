"""The exported step graph on ONNX Runtime (CPU), with the stac ops as Python custom ops.

    step = OnnxStep("stac_step.onnx")                 # one session, shared by many streams
    runtime = ExportedRuntime(step, "onnxruntime")    # or make_runtime("onnxruntime", params=..., model_dir=...)
    stream = runtime.open_stream(); out = stream.push(frames)
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ...graph.io import input_names, output_names, read_layout
from ...graph.layout import OUTPUTS, StepLayout
from .exported import ExportedRuntime, ExportedStream, check_cache_config, model_file, push_many  # noqa: F401 - push_many re-exported


class OnnxStep:
    """An ONNX Runtime session over an exported step graph, with its layout (a step executor)."""

    def __init__(self, path: Union[str, Path], threads: int = 0, providers: Optional[Sequence[str]] = None,
                 low_memory: bool = False):
        import onnxruntime as ort

        from ...graph.ort_ops import prepare_model, session_options

        self.path = Path(path)
        self.layout: StepLayout = read_layout(self.path)
        self.device = torch.device("cpu")
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

    def run(self, images: Tensor, frame_offset: Tensor, state: dict[str, Tensor]) -> tuple[dict, dict]:
        feeds = {"images": images.numpy(), "frame_offset": frame_offset.numpy()}
        feeds.update({"in_" + n: state[n].numpy() for n in self.state_names})
        with self._lock:
            values = self.session.run(self._outputs, feeds)
        tensors = [torch.from_numpy(np.ascontiguousarray(v)) for v in values]
        return dict(zip(OUTPUTS, tensors[: len(OUTPUTS)])), dict(zip(self.state_names, tensors[len(OUTPUTS):]))


class OnnxRuntimeStream(ExportedStream):
    """A stream over an exported graph on ONNX Runtime (``OnnxRuntimeStream("g.onnx").push(frames)``)."""

    def __init__(self, step: Union[OnnxStep, str, Path]):
        super().__init__(step if isinstance(step, OnnxStep) else OnnxStep(step))


def from_parameters(params: dict[str, str], model_dir: Optional[str] = None, **_) -> ExportedRuntime:
    """From Triton model-config parameters: ONNX_MODEL (path, relative to the model folder),
    ORT_THREADS (intra-op threads, 0 = default); CACHE_CONFIG, when given, must equal the graph's."""
    path = model_file(params, "ONNX_MODEL", model_dir, "RUNTIME=onnxruntime (an exported step graph: stac export onnx)")
    if not path.is_file():
        raise ValueError(f"ONNX_MODEL {path} not found")
    step = OnnxStep(path, threads=int(params.get("ORT_THREADS", "0") or 0))
    check_cache_config(params, step.layout, path.name)
    return ExportedRuntime(step, "onnxruntime")
