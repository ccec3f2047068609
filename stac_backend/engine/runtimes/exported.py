"""The runtime of an exported step graph, whatever executes it (ONNX Runtime or TensorRT).

An executor runs one batched call of the graph; everything else is here, once: frame checks
against the graph's fixed size and state capacity, stream bookkeeping, batching of same-shaped
chunks, memory accounting. A stream's state is a dict of torch tensors (on the executor's device),
allocated at its full budget on the first step.

    executor = OnnxStep("stac_step.onnx")             # or TensorRTStep("stac_step.plan")
    runtime = ExportedRuntime(executor)
    stream = runtime.open_stream()
    outs = runtime.step([stream], [stream.validate(frames)])

An executor has ``layout`` (``graph.StepLayout``), ``device``, ``max_batch`` (None: any) and
``run(images, frame_offset, state) -> (outputs, new_state)`` on torch tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol, Sequence

import torch
from torch import Tensor

from ...graph.layout import OUTPUTS, StepLayout
from ..frames import FrameInput, to_frame_tensor
from ..runtime import Runtime, RuntimeStream


class StepExecutor(Protocol):
    layout: StepLayout
    device: torch.device
    max_batch: Optional[int]

    def run(self, images: Tensor, frame_offset: Tensor, state: dict[str, Tensor]) -> tuple[dict, dict]: ...


class ExportedStream(RuntimeStream):
    """One camera stream over an exported step (the API of ``engine.Stream``)."""

    def __init__(self, step: StepExecutor):
        self.step = step
        self.chunk_size = step.layout.max_chunk
        self.state: Optional[dict[str, Tensor]] = None
        self.frames_seen = 0
        self.image_hw: Optional[tuple[int, int]] = None
        self.broken: Optional[str] = None
        self.device, self.dtype = step.device, torch.float32

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

    def push(self, frames: FrameInput) -> dict[str, Tensor]:
        return push_many([self], [self.validate(frames)])[0]

    def memory_bytes(self) -> int:
        return 0 if self.state is None else int(sum(t.numel() * t.element_size() for t in self.state.values()))

    def memory_bound(self, image_hw: Optional[tuple[int, int]] = None) -> Optional[int]:
        return self.layout.state_bytes()  # every budget is allocated up front

    def evicted_tokens(self) -> int:
        return 0  # the graph does not count them (it would cost a device read per step)

    def stats(self) -> dict:
        """What the state holds (reads the device: for tests and tools, not for the serving path)."""
        out = {"memory_bytes": self.memory_bytes(), "frames_seen": self.frames_seen}
        if self.state is not None:
            s = {k: v.cpu() for k, v in self.state.items() if k in ("hot_len", "kv_len", "pool_row_key", "ret_valid")}
            for key in ("hot_len", "kv_len"):
                if key in s:
                    out["tokens_per_head"] = int(s[key].reshape(-1)[0])
            if "pool_row_key" in s:
                out["pool_voxels"] = int((s["pool_row_key"] >= 0).sum())
                out["retrieved_per_head"] = int(s["ret_valid"].sum(dim=-1).max())
        return out

    def advance(self, state: dict[str, Tensor], out: dict[str, Tensor], images: Tensor) -> dict[str, Tensor]:
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
    """Indices of the streams that run as one call: same executor, same chunk shape, at most the
    executor's ``max_batch`` (None or 0: any number) per call."""
    groups: dict[tuple, list[int]] = {}
    for i, (s, frames) in enumerate(zip(streams, images)):
        groups.setdefault((id(s.step), tuple(frames.shape)), []).append(i)
    calls = []
    for members in groups.values():
        size = streams[members[0]].step.max_batch or len(members)
        calls.extend(members[start : start + size] for start in range(0, len(members), size))
    return calls


def push_many(streams: Sequence[ExportedStream], images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
    """One step for several streams (frames already validated); streams sharing an executor and a
    chunk shape run as one batched call. A stream's state changes only when its call succeeded, so
    a failure leaves every stream as it was."""
    results: list[Optional[dict[str, Tensor]]] = [None] * len(streams)
    for part in batch_groups(streams, images):
        step = streams[part[0]].step
        group = [streams[i] for i in part]
        names = step.layout.state_names()
        states = [s.state if s.state is not None else s.layout.empty_state(1, device=step.device) for s in group]
        state = {n: torch.cat([st[n] for st in states]) for n in names}
        batch = torch.stack([images[i] for i in part]).to(step.device, torch.float32)
        offsets = torch.tensor([s.frames_seen for s in group], dtype=torch.int64, device=step.device)
        outs, new = step.run(batch, offsets, state)
        for b, (i, s) in enumerate(zip(part, group)):
            out = {name: outs[name][b] for name in OUTPUTS}
            results[i] = s.advance({n: new[n][b : b + 1].clone() for n in names}, out, images[i])
    return results  # type: ignore[return-value]


class ExportedRuntime(Runtime):
    """The runtime interface over one executor (``onnxruntime`` or ``tensorrt``)."""

    def __init__(self, executor: StepExecutor, name: str):
        self.graph = executor
        self.name = name

    @property
    def cache_config(self):
        return self.graph.layout.cache

    def open_stream(self) -> ExportedStream:
        return ExportedStream(self.graph)

    def step(self, streams, images):
        return push_many(streams, images)


def model_file(params: dict[str, str], key: str, model_dir: Optional[str], hint: str) -> Path:
    """The file a model-config parameter names (required; a relative path is resolved against the
    model's folder in the repository)."""
    value = params.get(key, "")
    if not value:
        raise ValueError(f"{hint} needs the {key} parameter")
    path = Path(value)
    return Path(model_dir) / path if not path.is_absolute() and model_dir else path


def check_cache_config(params: dict[str, str], layout: StepLayout, source: str) -> None:
    """A CACHE_CONFIG parameter, when given, must equal the configuration the graph was exported with."""
    import json

    from ...cache import CacheConfig

    configured = params.get("CACHE_CONFIG", "")
    if configured:
        wanted = CacheConfig.from_dict(json.loads(configured))
        if wanted != layout.cache:
            raise ValueError(f"CACHE_CONFIG {wanted} differs from the cache configuration {source} was exported "
                             f"with ({layout.cache}); re-export or fix the parameter")
