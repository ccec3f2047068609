"""torch.compile (Inductor) for the cache-free parts of a streaming step.

What is compiled, one compiled function per kind of work (not per module instance: the 24 frame
blocks of vggt-1b share their code, and torch.compile lifts a module's parameters to graph inputs,
so all blocks of one shape reuse one compiled graph):

- a block without a cache (DINOv2 patch-embed blocks, frame blocks): norm, qkv, q/k norm, RoPE,
  attention, projection, LayerScale and MLP in one graph;
- a block whose attention reads a cache (global blocks, camera trunk): the part before the
  attention (norm, qkv, q/k norm, RoPE) and the part after it (projection, LayerScale, MLP) are
  two graphs; the cache's attention between them stays the engine's own (fused kernels, eager);
- the DPT heads, per chunk of frames they process at once.

RoPE's cos/sin tables are looked up before entering a graph (their length is read from the
positions once per positions tensor, a host read a graph must not contain) and passed in.

Shapes are static (``dynamic=False``): one graph per input shape, i.e. per (streams per step,
frames per step) bucket. ``TorchRuntime.warmup`` runs every bucket it will use and then freezes
the model: afterwards a call of a shape never compiled runs eagerly (same numbers, counted in
``stats.eager_calls``) instead of compiling inside a request. ``STAC_COMPILE=1`` or
``build_model(..., compile=True)`` turns it on (the serving setting ``COMPILE=auto``, the default,
does for CUDA instances that warm up: 1.12x the eager step at 8 streams on an H100,
docs/performance.md); ``STAC_COMPILE_MODE`` picks the torch.compile mode (default "default"; e.g.
"max-autotune-no-cudagraphs"). Inductor's own CUDA graphs ("reduce-overhead") do not fit: one
compiled function serves every block of a kind, and a replay overwrites the output of the previous
block while the next one still reads it. ``STAC_CUDA_GRAPHS=1`` on top of compiling captures the
compiled parts in graphs of their own that copy their outputs out (``cuda_graphs.py``).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .layers import Block
from .transfer import compiling_or_exporting

SWITCH_ENV = "STAC_COMPILE"
MODE_ENV = "STAC_COMPILE_MODE"
#: graphs one compiled function may hold: (blocks of distinct widths/eps) x (buckets) x (dtypes)
RECOMPILE_LIMIT = 256


def enabled_by_env() -> bool:
    return os.environ.get(SWITCH_ENV, "0") == "1"


def compiler_available(device: torch.device | str) -> Optional[str]:
    """None when Inductor can compile for ``device`` here, else why not (CPU code needs a C++
    compiler, CUDA code needs OpenAI Triton)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch.compile on CUDA needs the triton package"
        return None
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as error:  # no cl / g++ / clang++
        return f"torch.compile on the CPU needs a C++ compiler ({error})"
    return None


@dataclass
class CompileStats:
    """Counters over the compiled parts of one model (tests, warm-up reports, logs)."""

    signatures: int = 0  # distinct (function, input shapes) seen while compiling was allowed
    compiled_calls: int = 0
    eager_calls: int = 0  # calls of a shape never compiled after the model was frozen
    compile_seconds: float = 0.0  # wall time of the calls that compiled a new signature
    shapes: list[str] = field(default_factory=list)  # "function: shapes" of every signature

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------- the graphs
def _qkv_heads(block: Block, x: Tensor, pos: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor]):
    """norm1 -> qkv -> q/k norm -> RoPE: the eager ``SelfAttention.project_qkv`` arithmetic."""
    attn = block.attn
    B, N, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(B, N, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if cos is not None:
        rope = attn.rope
        q, k = _rotate(rope, q, pos, cos, sin), _rotate(rope, k, pos, cos, sin)
    return q, k, v


def _rotate(rope, x: Tensor, pos: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``RotaryEmbedding2D.forward`` with its tables given."""
    y_part, x_part = x.chunk(2, dim=-1)
    return torch.cat([rope._rotate(y_part, pos[..., 0], cos, sin), rope._rotate(x_part, pos[..., 1], cos, sin)], dim=-1)


def _dense_block(block: Block, x: Tensor, pos: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor]) -> Tensor:
    q, k, v = _qkv_heads(block, x, pos, cos, sin)
    return block.attention_outputs(x, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def _dpt_frames(head: nn.Module, layers: list, image_hw: tuple[int, int], patch_start_idx: int, frames: int,
                pos_embeds: Optional[tuple]):
    return head._eager_forward_frames(layers, image_hw, patch_start_idx, 0, frames, pos_embeds)


# ---------------------------------------------------------------------------------- wrappers
class CompiledParts:
    """The compiled functions of one model, its counters and whether it may still compile."""

    def __init__(self, mode: Optional[str] = None, backend: str = "inductor"):
        self.mode = mode or os.environ.get(MODE_ENV) or "default"
        self.backend = backend
        self.stats = CompileStats()
        self.frozen = False  # True: an input shape not compiled yet runs eagerly
        self._seen: set[tuple] = set()
        self._lock = threading.Lock()
        # mode only means something to Inductor; other backends (tests: "aot_eager") take none
        options = dict(dynamic=False, fullgraph=True, backend=backend)
        if backend == "inductor":
            options["mode"] = self.mode
        self.functions: dict[str, tuple[Callable, Callable]] = {
            name: (torch.compile(fn, **options), fn)
            for name, fn in (("dense_block", _dense_block), ("qkv_heads", _qkv_heads),
                             # the eager half after the attention, traced as it is (one definition)
                             ("after_attention", Block.attention_outputs), ("dpt_frames", _dpt_frames))
        }

    def call(self, name: str, *args):
        compiled, eager = self.functions[name]
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or compiling_or_exporting():
            return eager(*args)  # an exporter or an outer torch.compile traces the plain ops
        key = (name, torch.is_inference_mode_enabled(), torch.is_grad_enabled(), _signature(args))
        if key in self._seen:
            self.stats.compiled_calls += 1
            return compiled(*args)
        if self.frozen or torch.is_grad_enabled() and _has_trainable(args):
            self.stats.eager_calls += 1
            return eager(*args)
        with self._lock:  # one thread compiles a signature; the others wait for it
            started = time.perf_counter()
            out = compiled(*args)
            if key not in self._seen:
                self._seen.add(key)
                self.stats.signatures += 1
                self.stats.compile_seconds += time.perf_counter() - started
                self.stats.shapes.append(f"{name}: {_signature(args)[1:]}")
        self.stats.compiled_calls += 1
        return out


def _signature(args) -> tuple:
    """What decides a graph: the module's class and shapes, dtypes and devices of the tensors;
    other values as they are."""
    parts = []
    for a in args:
        if isinstance(a, Tensor):
            parts.append((tuple(a.shape), a.dtype, str(a.device), a.stride()))
        elif isinstance(a, nn.Module):
            parts.append(_module_signature(a))
        elif isinstance(a, (list, tuple)):
            parts.append(_signature(a))
        else:
            parts.append(a)
    return tuple(parts)


def _module_signature(module: nn.Module) -> tuple:
    """What tells a module's graphs apart: class, mode, first parameter, and what a graph bakes in
    as constants (norm eps: DINOv2's blocks differ from the aggregator's; FP8 layers; a head's
    activation)."""
    p = next(module.parameters(), None)
    norm = getattr(module, "norm1", None)
    return (type(module).__name__, module.training, None if p is None else (tuple(p.shape), p.dtype, str(p.device)),
            getattr(norm, "eps", None), type(getattr(module, "ls1", None)).__name__,
            type(getattr(getattr(module, "attn", None), "qkv", None)).__name__,  # Linear or Fp8Linear
            type(getattr(getattr(module, "mlp", None), "fc1", None)).__name__,
            getattr(module, "activation", None))  # DPT heads: depth ("exp") and points ("inv_log")


def _has_trainable(args) -> bool:
    return any(isinstance(a, nn.Module) and any(p.requires_grad for p in a.parameters()) for a in args)


class CompiledBlockForward:
    """Replaces one ``Block``'s ``forward``: the whole block compiled when it attends densely,
    the parts around the attention compiled when a cache attends."""

    def __init__(self, block: Block, parts: CompiledParts):
        self.block, self.parts = block, parts

    def __call__(self, x: Tensor, pos: Optional[Tensor] = None, attend=None) -> Tensor:
        if attend is None:
            return self.parts.call("dense_block", self.block, x, *self._rope_inputs(x, pos))
        return self.attention_outputs(x, attend(*self.attention_inputs(x, pos)))

    def attention_inputs(self, x: Tensor, pos: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """The compiled half before a cache's attention: q, k, v."""
        return self.parts.call("qkv_heads", self.block, x, *self._rope_inputs(x, pos))

    def attention_outputs(self, x: Tensor, attended: Tensor) -> Tensor:
        """The compiled half after a cache's attention."""
        # One memory layout whatever kernel attended (they differ by cache state): a graph is
        # specialised to its inputs' strides, and a few MB of copy cost less than another graph.
        return self.parts.call("after_attention", self.block, x, attended.contiguous())

    def _rope_inputs(self, x: Tensor, pos: Optional[Tensor]) -> tuple:
        """(pos, cos, sin) for the graphs: RoPE's tables looked up here, or three Nones without RoPE."""
        rope = self.block.attn.rope
        if rope is None:
            return None, None, None
        if pos is None:
            raise ValueError("this attention layer uses RoPE and needs token positions")
        cos, sin = rope.tables(pos, self.block.attn.head_dim // 2, x.device, x.dtype)
        return pos, cos, sin


class CompiledDPTFrames:
    """Replaces a DPT head's ``_forward_frames``: the frames of one chunk through a compiled graph."""

    def __init__(self, head: nn.Module, parts: CompiledParts):
        self.head, self.parts = head, parts

    def __call__(self, layers, image_hw, patch_start_idx, start, end):
        wanted = set(self.head.intermediate_layer_idx)
        chunk = [t[start:end] if (i in wanted and t is not None) else None for i, t in enumerate(layers)]
        image_hw = tuple(int(v) for v in image_hw)
        # The positional embeddings are constants made (once) outside the graph, which reads them
        # instead of recomputing their sines and cosines for every pixel of every frame.
        embeds = None
        if self.head.use_pos_embed:
            weight = self.head.projects[0].weight
            embeds = self.head.position_embeddings(image_hw, weight.device, weight.dtype)
        return self.parts.call("dpt_frames", self.head, chunk, image_hw, int(patch_start_idx), end - start, embeds)


def compile_static_parts(model: nn.Module, mode: Optional[str] = None, backend: str = "inductor") -> CompiledParts:
    """Give the model's cache-free parts compiled forwards (see the module docstring); returns
    the model's ``CompiledParts`` (also ``model.compiled_parts``). Calling it twice returns the
    first call's. The module tree and its state dict are unchanged."""
    existing = getattr(model, "compiled_parts", None)
    if existing is not None:
        return existing
    if getattr(model, "cuda_graph_stats", None) is not None:
        # The graphs hold the eager forwards: compile first, then graph (as build_model does).
        raise ValueError("this model already replays CUDA graphs (STAC_CUDA_GRAPHS): compile it before giving "
                         "it graphs, e.g. build_model(..., compile=True, cuda_graphs=True)")
    device = next(model.parameters()).device
    missing = compiler_available(device) if backend == "inductor" else None
    if missing:
        raise RuntimeError(missing)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
    parts = CompiledParts(mode, backend)
    for module in model.modules():
        if isinstance(module, Block):
            module.forward = CompiledBlockForward(module, parts)
    for name in ("depth_head", "point_head"):
        head = getattr(model, name, None)
        if head is not None and not getattr(head, "feature_only", False):
            head._eager_forward_frames = head._forward_frames
            head._forward_frames = CompiledDPTFrames(head, parts)
    model.compiled_parts = parts
    return parts
