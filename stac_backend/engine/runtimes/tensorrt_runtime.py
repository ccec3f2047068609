"""Streams that run a TensorRT engine of the exported step (GPU), with the stac plugins in-process.

NOT EXERCISED HERE: needs ``tensorrt`` and a CUDA GPU (tests skip without them; docs/export.md).

    step = TensorRTStep("stac_step.plan")            # registers the plugins, deserializes the engine
    stream = TensorRTStream(step)
    out = stream.push(frames)                         # dict of [C, ...] tensors (on the GPU)

Same contract as ``ort_runtime.OnnxRuntimeStream`` (validation, frame budgets, batched
``push_many``); the state lives in torch CUDA tensors and never leaves the GPU.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..engine.frames import FrameInput
from ..engine.runtime import Runtime
from .exported_stream import ExportedStream, batch_groups
from .layout import OUTPUTS
from .onnx_export import input_names, output_names


def _torch_dtype(trt_dtype) -> torch.dtype:
    import tensorrt as trt

    return {
        trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16, trt.int32: torch.int32,
        trt.int64: torch.int64, trt.bool: torch.bool, trt.int8: torch.int8, trt.uint8: torch.uint8,
    }[trt_dtype]


class TensorRTStep:
    """A deserialized engine + one execution context (one step at a time)."""

    def __init__(self, plan: Union[str, Path], device: Union[str, torch.device] = "cuda"):
        import tensorrt as trt

        from .trt_build import read_plan_layout
        from .trt_plugins import register

        register()  # the engine's plugin layers are resolved at deserialization
        self.path = Path(plan)
        self.layout, self.meta = read_plan_layout(self.path)
        self.device = torch.device(device)
        self.max_batch = int(self.meta.get("max_batch", 1))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"could not deserialize {self.path} (TensorRT version or plugins differ from the build?)")
        self.context = self.engine.create_execution_context()
        self.state_names = self.layout.state_names()
        self._inputs, self._outputs = input_names(self.layout), output_names(self.layout)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        missing = sorted(set(self._inputs + self._outputs) - set(names))
        if missing:
            raise ValueError(f"{self.path}: engine lacks tensors {missing}")
        self._dtypes = {n: _torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.stream = torch.cuda.Stream(device=self.device)
        self._lock = threading.Lock()

    @property
    def config(self):
        return self.layout.model

    def run(self, images: Tensor, frame_offset: Tensor, state: dict[str, Tensor]) -> tuple[dict, dict]:
        feeds = {"images": images, "frame_offset": frame_offset}
        feeds.update({"in_" + n: state[n] for n in self.state_names})
        with self._lock, torch.cuda.stream(self.stream):
            for name in self._inputs:
                t = feeds[name].to(self.device, self._dtypes[name]).contiguous()
                feeds[name] = t
                self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, t.data_ptr())
            results = {}
            for name in self._outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                results[name] = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
                self.context.set_tensor_address(name, results[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            self.stream.synchronize()
        outs = {n: results[n] for n in OUTPUTS}
        new = {n: results["out_" + n] for n in self.state_names}
        return outs, new


class TensorRTStream(ExportedStream):
    """One camera stream whose steps run the TensorRT engine; its state lives in device tensors."""

    def __init__(self, step: Union[TensorRTStep, str, Path]):
        step = step if isinstance(step, TensorRTStep) else TensorRTStep(step)
        super().__init__(step, step.device)

    def push(self, frames: FrameInput) -> dict[str, Tensor]:
        return push_many([self], [self.validate(frames)])[0]

    def memory_bytes(self) -> int:
        return 0 if self.state is None else int(sum(t.numel() * t.element_size() for t in self.state.values()))


def push_many(streams: Sequence[TensorRTStream], images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
    """One step for several streams; same-shaped chunks on one engine run batched (up to max_batch)."""
    results: list[Optional[dict[str, Tensor]]] = [None] * len(streams)
    for part in batch_groups(streams, images):
        step = streams[part[0]].step
        group = [streams[i] for i in part]
        for s in group:
            if s.state is None:
                s.state = s.layout.empty_state(1, device=step.device)
        batch = torch.stack([images[i] for i in part])
        offsets = torch.tensor([s.frames_seen for s in group], dtype=torch.int64, device=step.device)
        state = {n: torch.cat([s.state[n] for s in group]) for n in step.state_names}
        outs, new = step.run(batch, offsets, state)
        for b, (i, s) in enumerate(zip(part, group)):
            out = {name: outs[name][b] for name in OUTPUTS}
            results[i] = s.advance({n: new[n][b : b + 1].clone() for n in step.state_names}, out, images[i])
    return results  # type: ignore[return-value]


class TensorRTEngine(Runtime):
    """What ``serving.sessions.StreamSessions`` needs (Triton model with RUNTIME=tensorrt)."""

    name = "tensorrt"

    def __init__(self, step: TensorRTStep):
        self.graph = step

    @property
    def cache_config(self):
        return self.graph.layout.cache

    def open_stream(self) -> TensorRTStream:
        return TensorRTStream(self.graph)

    def step(self, streams, images):
        return push_many(streams, images)

    @classmethod
    def from_parameters(cls, params: dict, model_dir: Optional[str], device: str = "cuda") -> "TensorRTEngine":
        """TRT_PLAN: the engine (relative to the model folder), built by plugins/tensorrt/build_engine.py."""
        plan = params.get("TRT_PLAN", "")
        if not plan:
            raise ValueError("RUNTIME=tensorrt needs the TRT_PLAN parameter (plugins/tensorrt/build_engine.py)")
        path = Path(plan)
        if not path.is_absolute() and model_dir:
            path = Path(model_dir) / path
        return cls(TensorRTStep(path, device=device))


__all__ = ["TensorRTStep", "TensorRTStream", "TensorRTEngine", "push_many"]
