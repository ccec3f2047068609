"""CUDA graphs for the parts of a streaming step whose shapes never change (opt-in).

One step of one camera (4 frames of vggt-1b) launches ~3000 kernels. On a GPU machine with a slow
host the host can need longer to launch them than the GPU to run them (the H200 of
docs/benchmarks/profile_step_h200.txt: 81 ms of GPU work per stac step, 112 ms per step
unprofiled, policies_h200.json). Everything of a step that does not read a cache does the same
work every step for a given input shape, and is captured once per input shape as a CUDA graph and
then replayed (one launch instead of dozens to hundreds):
- the patch embedding, the frame-attention blocks and the DPT heads, whole;
- the global blocks and the camera trunk's blocks in two halves, the part before the attention
  (norm, qkv, q/k norm, RoPE) and the part after it (projection, MLP): the cache's attention
  between them changes shape every step, may wait for the host, and stays eager.

Off by default: on the H100 where it was measured (docs/performance.md, `cuda_graphs_ab_h100`) the
eager step was not launch-bound and graphs changed nothing beyond run-to-run noise. On a compiled
model (``STAC_COMPILE=1`` as well) the graphs capture the compiled parts' kernels and remove their
wrappers' host time: there, one stream ran 1.11x faster on an H100 (16.3 against 18.3 ms/frame,
`engine_step_graphs_h100`), and bigger batched steps no faster. The graphs of one model share their
static buffers and a memory pool (``GraphSet``). ``build_model(..., cuda_graphs=True)``,
``STAC_CUDA_GRAPHS=1`` or the serving parameter ``CUDA_GRAPHS=1`` turns them on. The module tree
and its state dict are unchanged: only the instances' ``forward`` is replaced. A graph is used only
in inference (no autograd, module in eval mode, not while exporting) and for small inputs
(``STAC_CUDA_GRAPH_MAX_FRAMES``, default 8 frames per call: the one- and two-camera steps where
launch overhead matters; bigger batched steps amortise it and would pay the static buffers in
memory). Anything else - and any input whose capture fails - runs eagerly.
"""

from __future__ import annotations

import logging
import os
import sys
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
    inputs: list[Tensor]  # static input buffers (shared, see GraphSet), refilled before each replay
    outputs: list[Any]  # the outputs' static buffers (shared) and constants, flattened; copied out after each replay
    outputs_spec: Any  # their structure, to rebuild the copies


class GraphSet:
    """What every graph of one model shares: a memory pool, the counters, one lock, the frame limit
    and the static buffers.

    Static buffers are shared between graphs by (role, position, shape, dtype, strides): the 24 frame
    blocks of a step read their input from one buffer and copy their output into one buffer, instead
    of each graph holding its own. That is safe because graphs of one model never run at the same
    time (one lock) and every replay refills its inputs before and copies its outputs out after.
    The graphs' intermediate memory comes from one pool, where later captures reuse what earlier
    ones freed, for the same reason."""

    def __init__(self, pool, stats: GraphStats, max_frames: int):
        self.pool, self.stats, self.max_frames = pool, stats, max_frames
        # Re-entrant, so that a graphed part calling another would not deadlock; the parts that
        # graph_static_parts picks are disjoint (none calls another), which the shared buffers need.
        self.lock = threading.RLock()
        self.buffers: dict[tuple, Tensor] = {}

    def buffer(self, role: str, position: int, like: Tensor) -> Tensor:
        """The shared static buffer for a tensor like ``like`` at ``position`` of a graph's inputs or outputs."""
        # Inference tensors cannot be written outside inference mode: buffers per mode.
        key = (role, position, tuple(like.shape), like.dtype, like.device, like.stride(), torch.is_inference_mode_enabled())
        if key not in self.buffers:
            self.buffers[key] = torch.empty_like(like)
        return self.buffers[key]


class GraphedForward:
    """Replaces one callable (a module's ``forward``, or one half of a block, ``CacheBlockGraphs``):
    replays a CUDA graph per input signature, else runs eagerly."""

    def __init__(self, module: nn.Module, name: str, eager: Callable, graphs: GraphSet, frames: FrameCounter):
        self.module, self.name, self.eager = module, name, eager
        self.shared, self.stats, self.frames = graphs, graphs.stats, frames
        self.graphs: dict[tuple, _Graph] = {}
        self.unusable: set[tuple] = set()  # signatures whose capture failed: always eager

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
        # Static buffers are shared by every graph of the model: one refill-replay-copy at a time.
        with self.shared.lock:
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
        return self.frames(tensors) <= self.shared.max_frames

    def _capture(self, key: tuple, leaves: list, spec) -> Optional[_Graph]:
        inputs, position = [], 0
        for x in leaves:
            if isinstance(x, Tensor):
                x = self.shared.buffer("input", position, x).copy_(x)
                position += 1
            inputs.append(x)
        static = [x for x in inputs if isinstance(x, Tensor)]
        args, kwargs = tree_unflatten(inputs, spec)
        try:
            # Warm-up off the capturing stream (PyTorch's recipe): compiles Triton kernels, sets up
            # cuBLAS workspaces and fills lazily built tables (RoPE) outside the graph.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    warm = self.eager(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(side)
            # The outputs' static buffers are made outside the capture (not in the graphs' pool) and
            # shared; the graph ends by copying its outputs into them, and its own output memory
            # goes back to the pool for the next capture.
            flat_warm, outputs_spec = tree_flatten(warm)
            outputs, position = [], 0
            for x in flat_warm:
                if isinstance(x, Tensor):
                    x = self.shared.buffer("output", position, x)
                    position += 1
                outputs.append(x)
            del warm, flat_warm
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.shared.pool):
                captured = tree_flatten(self.eager(*args, **kwargs))[0]
                for buffer, x in zip(outputs, captured):
                    if isinstance(buffer, Tensor):
                        buffer.copy_(x)
                del captured
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
        self.graphs[key] = _Graph(graph, static, outputs, outputs_spec)
        return self.graphs[key]


class CacheBlockGraphs:
    """Replaces the forward of a block whose attention reads a cache (global blocks, the camera
    trunk): the half before the attention and the half after it replay graphs of their own
    (``Block.attention_inputs`` / ``attention_outputs``, or their compiled forms); the cache's
    attention between them, whose shapes change every step and which may wait for the host,
    runs eagerly."""

    def __init__(self, block: nn.Module, name: str, graphs: GraphSet, frames: FrameCounter):
        forward = block.forward
        # A compiled block's forward has the same two halves (compiled.CompiledBlockForward).
        halves = forward if hasattr(forward, "attention_inputs") else block
        self.dense = forward
        self.inputs = GraphedForward(block, f"{name}.attention_inputs", halves.attention_inputs, graphs, frames)
        self.outputs = GraphedForward(block, f"{name}.attention_outputs", halves.attention_outputs, graphs, frames)

    def __call__(self, x: Tensor, pos: Optional[Tensor] = None, attend=None) -> Tensor:
        if attend is None:
            return self.dense(x, pos)
        q, k, v = self.inputs(x, pos)
        return self.outputs(x, attend(q, k, v))


def enabled_by_env() -> bool:
    return os.environ.get(SWITCH_ENV, "0") == "1"


def graph_static_parts(model: nn.Module, max_frames: Optional[int] = None) -> GraphStats:
    """Give the model's cache-free parts CUDA graphs (see the module docstring); returns the counters.

    Looks for the VGGT layout: ``aggregator.patch_embed``, ``aggregator.frame_blocks`` and
    ``aggregator.global_blocks``, ``camera_head.trunk``, ``depth_head``, ``point_head``. Calling it
    twice returns the first call's counters.
    """
    existing = getattr(model, "cuda_graph_stats", None)
    if existing is not None:
        return existing
    if max_frames is None:
        max_frames = int(os.environ.get(MAX_FRAMES_ENV, DEFAULT_MAX_FRAMES))
    stats = GraphStats()
    # one memory pool: the graphs replay one after another
    graphs = GraphSet(torch.cuda.graph_pool_handle() if torch.cuda.is_available() else None, stats, max_frames)
    aggregator = model.aggregator
    targets: list[tuple[str, nn.Module, FrameCounter]] = [("aggregator.patch_embed", aggregator.patch_embed, leading_frames)]
    targets += [(f"aggregator.frame_blocks.{i}", b, leading_frames) for i, b in enumerate(aggregator.frame_blocks)]
    for name in ("depth_head", "point_head"):
        head = getattr(model, name, None)
        if head is not None:
            targets.append((name, head, stream_frames))
    for name, module, frames in targets:
        module.forward = GraphedForward(module, name, module.forward, graphs, frames)
    step_frames = _step_frames(aggregator)
    for i, block in enumerate(aggregator.global_blocks):
        block.forward = CacheBlockGraphs(block, f"aggregator.global_blocks.{i}", graphs, step_frames)
    camera_head = getattr(model, "camera_head", None)
    for i, block in enumerate(getattr(camera_head, "trunk", ())):
        block.forward = CacheBlockGraphs(block, f"camera_head.trunk.{i}", graphs, stream_frames)
    model.cuda_graph_stats = stats
    return stats


def _step_frames(aggregator: nn.Module) -> FrameCounter:
    """Frames of a global block's call (tokens [streams, frames x tokens per frame, C]): the
    aggregator's step, whose streams x frames it records (no step seen: too many to graph)."""
    def frames(tensors: list[Tensor]) -> int:
        count = aggregator.step_frames()
        return sys.maxsize if count is None else count

    return frames
