"""The runtime interface: what a server needs from whatever executes the model's steps.

Three implementations exist: the torch engine (``torch``), the exported step graph on ONNX Runtime
(``onnxruntime``) and on TensorRT (``tensorrt``). Serving talks to this interface only, so it never
learns which one runs, nor anything about cache internals:

    runtime = make_runtime("torch", model=model, cache_config=CacheConfig(policy="stac"))
    stream = runtime.open_stream()                 # one camera; holds its caches / state
    images = stream.validate(frames)               # ValueError names the problem; stream untouched
    bound = stream.memory_bound(images.shape[-2:]) # most bytes it can ever hold (None: unbounded)
    outs = runtime.step([stream], [images])        # one batched step for many streams
    runtime.step_memory_bytes(images.shape[-2:])   # what a step adds on top (admission reserves it once)
    stream.memory_bytes(), stream.evicted_tokens(), stream.frames_seen
    stream.reset()                                 # free everything; the next step is frame 0

A step that raises ``ValueError`` left every stream as it was (e.g. a budget refused before any
work); any other exception may have left the streams of that step half-updated, and their
``broken`` attribute then says why (the server closes them).

Implementations register a factory under their name; ``make_runtime`` builds one by name. The
exported runtimes register lazily (their modules import onnxruntime / tensorrt only when built).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any, Callable, Optional, Sequence

from torch import Tensor

from .frames import FrameInput


class RuntimeStream(ABC):
    """One camera stream as a runtime holds it."""

    #: frames stepped so far (the next step's first frame index)
    frames_seen: int = 0
    #: why the stream is unusable after a failed step (None while it is healthy)
    broken: Optional[str] = None

    @abstractmethod
    def validate(self, frames: FrameInput) -> Tensor:
        """Checked frames ready for ``Runtime.step``; raises ValueError naming the problem."""

    @abstractmethod
    def memory_bytes(self) -> int:
        """Bytes this stream holds right now, exactly."""

    @abstractmethod
    def memory_bound(self, image_hw: Optional[tuple[int, int]] = None) -> Optional[int]:
        """The most bytes this stream can ever hold at frames of ``image_hw`` (default: the size it
        has seen); None where its cache is unbounded or the size is not known yet."""

    def resting_memory_bound(self, image_hw: Optional[tuple[int, int]] = None) -> Optional[int]:
        """The most bytes this stream holds between steps (its share of a step, the step's new
        tokens before they are pruned, is part of ``Runtime.step_memory_bytes`` where that is
        known); by default ``memory_bound``."""
        return self.memory_bound(image_hw)

    def evicted_tokens(self) -> int:
        """Tokens its cache has evicted so far (a host-side count: reading it never waits for the GPU)."""
        return 0

    @abstractmethod
    def reset(self) -> None:
        """Forget everything and free its memory; the next step starts a new stream at frame 0."""


class Runtime(ABC):
    """Executes steps for many streams of one model and one cache configuration."""

    #: the name it is registered under
    name: str = "base"

    @abstractmethod
    def open_stream(self) -> RuntimeStream:
        """A new, empty stream."""

    @abstractmethod
    def step(self, streams: Sequence[RuntimeStream], images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """One step for each stream on its validated chunk; per-frame outputs [C, ...] per stream."""

    def warmup(self, image_hw: tuple[int, int], batch_sizes: Sequence[int] = (1,)) -> None:
        """Run whatever compiles or allocates on first use, so that no request pays for it; leaves
        no stream and no memory of its own behind."""

    def step_memory_bytes(self, image_hw: tuple[int, int]) -> Optional[int]:
        """The most bytes one step adds on top of its streams' own memory (activations, transient
        copies, outputs) at frames of ``image_hw``, whatever the number of streams stepped; None
        where it is not known or grows with the number of streams. Admission reserves it once,
        beside the streams' memory bounds."""
        return None

    def step_output_bytes(self, image_hw: tuple[int, int]) -> Optional[int]:
        """Bytes one stream's step outputs hold on the device until the step returns, where a
        step runs in parts whose outputs accumulate (not inside ``step_memory_bytes``); admission
        charges it per stream. None where not known or already inside ``step_memory_bytes``."""
        return None


_FACTORIES: dict[str, Callable[..., Runtime] | str] = {
    "torch": "stac_backend.engine.torch_runtime:TorchRuntime",
    "onnxruntime": "stac_backend.engine.runtimes.onnx_runtime:from_parameters",
    "tensorrt": "stac_backend.engine.runtimes.tensorrt_runtime:from_parameters",
}


def register_runtime(name: str, factory: Callable[..., Runtime] | str) -> None:
    """Register a runtime factory (a callable, or ``"module:attribute"`` imported on first use)."""
    _FACTORIES[name] = factory


def runtime_names() -> list[str]:
    return sorted(_FACTORIES)


def make_runtime(name: str, **options: Any) -> Runtime:
    """Build the runtime registered under ``name`` with its keyword options."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"unknown runtime {name!r}; known: {', '.join(runtime_names())}")
    if isinstance(factory, str):
        module, _, attribute = factory.partition(":")
        factory = importlib.import_module(module)
        for part in attribute.split("."):
            factory = getattr(factory, part)
    return factory(**options)
