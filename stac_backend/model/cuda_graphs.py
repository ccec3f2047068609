"""CUDA graphs for the parts of a streaming step whose shapes never change (opt-in).

One step of one camera (4 frames of vggt-1b) launches ~3000 kernels. On a GPU machine with a slow
host the host can need longer to launch them than the GPU to run them (the H200 of
docs/benchmarks/profile_step_h200.txt: 81 ms of GPU work per stac step, 112 ms per step
unprofiled, policies_h200.json). The patch
embedding, the frame-attention blocks and the DPT heads never read a cache: for a given input shape
they do the same work every step. Each is captured once per input shape as a CUDA graph and then
replayed (one launch instead of dozens to hundreds). Global blocks and the camera head read
key/value caches whose size changes every step; they stay eager.

Off by default: on the H100 where it was measured (docs/performance.md, `cuda_graphs_ab_h100`) the eager step
was not launch-bound and graphs changed nothing beyond run-to-run noise, while each graph holds
static buffers. ``STAC_CUDA_GRAPHS=1`` (or ``build_model(..., cuda_graphs=True)``) turns it on.
On a compiled model (``STAC_COMPILE=1`` as well) the graphs capture the compiled parts' kernels:
there, one stream ran 1.07-1.12x faster (`engine_step_graphs_h100`), for 2.6 GiB of static buffers
that stay held when bigger steps run without graphs. The module
tree and its state dict are unchanged: only the instances' ``forward`` is replaced by a
``GraphedForward``. A graph is used only in inference (no autograd, module in eval mode, not while
exporting) and for small inputs (``STAC_CUDA_GRAPH_MAX_FRAMES``, default 8 frames per call: the one-
and two-camera steps where launch overhead matters; bigger batched steps amortise it and would pay
the static buffers in memory). Anything else - and any input whose capture fails - runs eagerly.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .transfer import compiling_or_exporting

log = logging.getLogger(__name__)

SWITCH_ENV = "STAC_CUDA_GRAPHS"
MAX_FRAMES_ENV = "STAC_CUDA_GRAPH_MAX_FRAMES"
DEFAULT_MAX_FRAMES = 8

# frames(tensors) -> how many frames one call covers (decides whether a graph is worth its memory)
FrameCounter = Callable[[list[Tensor]], int]


def leading_frames(tensors: list[Tensor]) -> int:
    """Inputs shaped [frames, ...] (patch embedding, frame blocks)."""
    return tensors[0].shape[0]


def stream_frames(tensors: list[Tensor]) -> int:
    """Inputs shaped [streams, frames, ...] (DPT heads)."""
    return tensors[0].shape[0] * tensors[0].shape[1]


@dataclass
class GraphStats:
    """Counters over every graphed module of one model (for tests, benchmarks and logs)."""

    captured: int = 0  # graphs captured (one per module and input signature)
    replays: int = 0
    eager_calls: int = 0  # calls that ran eagerly (too big, autograd, training, not CUDA, ...)
    failed: list[str] = field(default_factory=list)  # "module: error" of captures that failed

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[Tensor]  # static input buffers, refilled before each replay
    outputs: list[Any]  # the captured call's outputs, flattened (static; copied out after each replay)
    outputs_spec: Any  # their structure, to rebuild the copies


class GraphedForward:
    """Replaces one module's ``forward``: replays a CUDA graph per input signature, else eager."""

    def __init__(self, module: nn.Module, name: str, eager: Callable, pool, stats: GraphStats, max_frames: int,
                 frames: FrameCounter):
        self.module, self.name, self.eager = module, name, eager
        self.pool, self.stats, self.max_frames, self.frames = pool, stats, max_frames, frames
        self.graphs: dict[tuple, _Graph] = {}
        self.unusable: set[tuple] = set()  # signatures whose capture failed: always eager
        # Static buffers are shared state: two threads must not interleave refill and replay.
        self.lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, Tensor)]
        if not self._may_graph(tensors):
            self.stats.eager_calls += 1
            return self.eager(*args, **kwargs)
        key = (
            spec,
            tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, Tensor) else ("const", x) for x in leaves),
            torch.is_inference_mode_enabled(),
        )
        with self.lock:
            if key in self.unusable:
                self.stats.eager_calls += 1
                return self.eager(*args, **kwargs)
            graph = self.graphs.get(key)
            if graph is None:
                graph = self._capture(key, leaves, spec)
                if graph is None:
                    self.stats.eager_calls += 1
                    return self.eager(*args, **kwargs)
            for buffer, x in zip(graph.inputs, tensors):
                buffer.copy_(x)
            graph.graph.replay()
            self.stats.replays += 1
            # Copies: the static outputs are overwritten by the next replay, callers keep theirs.
            return tree_unflatten([x.clone() if isinstance(x, Tensor) else x for x in graph.outputs], graph.outputs_spec)

    def _may_graph(self, tensors: list[Tensor]) -> bool:
        if not tensors or self.module.training:
            return False
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.module.parameters()):
            return False  # autograd needs the eager ops
        if not all(x.is_cuda for x in tensors) or torch.cuda.is_current_stream_capturing():
            return False
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or compiling_or_exporting():
            return False
        return self.frames(tensors) <= self.max_frames

    def _capture(self, key: tuple, leaves: list, spec) -> Optional[_Graph]:
        inputs = [x.detach().clone() if isinstance(x, Tensor) else x for x in leaves]
        static = [x for x in inputs if isinstance(x, Tensor)]
        args, kwargs = tree_unflatten(inputs, spec)
        try:
            # Warm-up off the capturing stream (PyTorch's recipe): compiles Triton kernels, sets up
            # cuBLAS workspaces and fills lazily built tables (RoPE) outside the graph.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.eager(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = self.eager(*args, **kwargs)
        except Exception as error:  # a host synchronisation or an uncapturable op: stay eager
            try:
                torch.cuda.synchronize()
            except Exception:  # the failed capture's own error again; the next eager call tells if it is sticky
                pass
            self.unusable.add(key)
            self.stats.failed.append(f"{self.name}: {type(error).__name__}: {error}")
            log.warning("CUDA graph capture of %s failed, running it eagerly: %s", self.name, error)
            return None
        self.stats.captured += 1
        self.graphs[key] = _Graph(graph, static, *tree_flatten(outputs))
        return self.graphs[key]


def enabled_by_env() -> bool:
    return os.environ.get(SWITCH_ENV, "0") == "1"


def graph_static_parts(model: nn.Module, max_frames: Optional[int] = None) -> GraphStats:
    """Give the model's cache-free parts CUDA graphs (see the module docstring); returns the counters.

    Looks for the VGGT layout: ``aggregator.patch_embed``, ``aggregator.frame_blocks``,
    ``depth_head``, ``point_head``. Calling it twice returns the first call's counters.
    """
    existing = getattr(model, "cuda_graph_stats", None)
    if existing is not None:
        return existing
    if max_frames is None:
        max_frames = int(os.environ.get(MAX_FRAMES_ENV, DEFAULT_MAX_FRAMES))
    stats = GraphStats()
    pool = torch.cuda.graph_pool_handle()  # one memory pool: the graphs replay one after another
    aggregator = model.aggregator
    targets: list[tuple[str, nn.Module, FrameCounter]] = [("aggregator.patch_embed", aggregator.patch_embed, leading_frames)]
    targets += [(f"aggregator.frame_blocks.{i}", b, leading_frames) for i, b in enumerate(aggregator.frame_blocks)]
    for name in ("depth_head", "point_head"):
        head = getattr(model, name, None)
        if head is not None:
            targets.append((name, head, stream_frames))
    for name, module, frames in targets:
        module.forward = GraphedForward(module, name, module.forward, pool, stats, max_frames, frames)
    model.cuda_graph_stats = stats
    return stats
