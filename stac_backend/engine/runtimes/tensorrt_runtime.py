"""The exported step graph as a TensorRT engine (GPU), with the stac plugins registered in-process.

    step = TensorRTStep("stac_step.plan")            # registers the plugins, deserializes the engine
    runtime = ExportedRuntime(step, "tensorrt")      # or make_runtime("tensorrt", params=..., model_dir=...)
    stream = runtime.open_stream(); out = stream.push(frames)   # state in CUDA tensors, never leaves the GPU

Works with either TensorRT package (``graph.tensorrt``). The engine's I/O is checked against what
the build recorded in ``<plan>.layout.json``. Executing needs a GPU the package supports: the
datacenter package on datacenter GPUs; TensorRT-RTX refuses compute capability 9.0 (H100/H200).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from ...graph.io import input_names, output_names
from ...graph.layout import OUTPUTS, StepLayout
from .exported import ExportedRuntime, ExportedStream, check_cache_config, model_file, push_many  # noqa: F401 - push_many re-exported


def plan_meta_path(plan_path: Union[str, Path]) -> Path:
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name + ".layout.json")


def read_plan_meta(plan_path: Union[str, Path]) -> tuple[StepLayout, dict]:
    """The layout and build record written beside an engine by ``stac export tensorrt``."""
    meta = json.loads(plan_meta_path(plan_path).read_text())
    return StepLayout.from_json(json.dumps(meta["layout"])), meta


def check_plan(plan_path: Union[str, Path]) -> tuple[StepLayout, dict]:
    """The plan's layout and build record, after checking that the engine's recorded I/O is the
    layout's (names in order, dtypes, ranks); raises ValueError naming the difference. Needs no GPU."""
    from ...graph.layout import dtype_name

    layout, meta = read_plan_meta(plan_path)
    io = meta.get("io", [])
    expected = {"images": ("float32", 5), "frame_offset": ("int64", 1)}
    for s in layout.state():
        expected["in_" + s.name] = expected["out_" + s.name] = (dtype_name(s.dtype), 1 + len(s.shape))
    inputs = [t["name"] for t in io if t["mode"] == "input"]
    outputs = [t["name"] for t in io if t["mode"] == "output"]
    if inputs != input_names(layout) or outputs != output_names(layout):
        raise ValueError(f"{plan_path}: engine I/O {inputs} -> {outputs} is not its layout's")
    for t in io:
        want = expected.get(t["name"])
        if want is not None and (t["dtype"], len(t["shape"])) != want:
            raise ValueError(f"{plan_path}: engine tensor {t['name']} is {t['dtype']} of rank {len(t['shape'])}, "
                             f"the layout says {want[0]} of rank {want[1]}")
    return layout, meta


def _torch_dtype(trt, trt_dtype) -> torch.dtype:
    return {
        trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16, trt.int32: torch.int32,
        trt.int64: torch.int64, trt.bool: torch.bool, trt.int8: torch.int8, trt.uint8: torch.uint8,
    }[trt_dtype]


class TensorRTStep:
    """A deserialized engine + one execution context (one step at a time): a step executor."""

    def __init__(self, plan: Union[str, Path], device: Union[str, torch.device] = "cuda"):
        from ...graph.tensorrt import load
        from ...graph.trt_plugins import register

        trt = load()
        register(trt)  # the engine's plugin layers are resolved at deserialization
        self.path = Path(plan)
        self.layout, self.meta = read_plan_meta(self.path)
        self.device = torch.device(device)
        self.max_batch = int(self.meta.get("max_batch", 1))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"could not deserialize {self.path} (TensorRT package, version or GPU differ from "
                               f"the build's {self.meta.get('tensorrt')}?)")
        self.context = self.engine.create_execution_context()
        self.state_names = self.layout.state_names()
        self._inputs, self._outputs = input_names(self.layout), output_names(self.layout)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        missing = sorted(set(self._inputs + self._outputs) - set(names))
        if missing:
            raise ValueError(f"{self.path}: engine lacks tensors {missing}")
        self._dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
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
        return {n: results[n] for n in OUTPUTS}, {n: results["out_" + n] for n in self.state_names}


class TensorRTStream(ExportedStream):
    """A stream over a TensorRT engine (``TensorRTStream("g.plan").push(frames)``)."""

    def __init__(self, step: Union[TensorRTStep, str, Path]):
        super().__init__(step if isinstance(step, TensorRTStep) else TensorRTStep(step))


def from_parameters(params: dict[str, str], model_dir: Optional[str] = None, device: str = "cuda",
                    **_) -> ExportedRuntime:
    """From Triton model-config parameters: TRT_PLAN (the engine, relative to the model folder; built
    by ``stac export tensorrt`` or ``stac export repository``); CACHE_CONFIG, when given, must equal it."""
    path = model_file(params, "TRT_PLAN", model_dir, "RUNTIME=tensorrt (an engine: stac export tensorrt)")
    if not path.is_file() or not plan_meta_path(path).is_file():
        raise ValueError(f"TRT_PLAN {path} or its {plan_meta_path(path).name} not found")
    layout, _ = check_plan(path)
    check_cache_config(params, layout, path.name)
    return ExportedRuntime(TensorRTStep(path, device=device), "tensorrt")
