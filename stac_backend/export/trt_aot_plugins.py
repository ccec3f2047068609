"""Datacenter TensorRT only (``tensorrt.plugin`` >= 10.10; TensorRT-RTX has no such module): the
ops of ``trt_aot.AOT_OPS`` (StacAttention, StacScoreDecay) as quickly-deployable plugins whose
ahead-of-time implementation is an OpenAI-Triton kernel compiled to PTX while the engine is built
and baked into it, so TensorRT launches it without Python.

``register_aot(trt)`` replaces the IPluginV3 creators of those two ops (``graph.trt_plugins``) by
these definitions for the rest of the process; ``trt_build.build_engine(plugins="aot")`` calls it
and marks the graph's nodes with ``aot=1`` (what the parser reads to take the AOT implementation).
Written against the documented ``tensorrt.plugin`` API; no TensorRT that has it was available to
run it (docs/export.md).
"""

# No `from __future__ import annotations`: tensorrt.plugin reads these functions' type hints.
import threading
from typing import Tuple

from ..graph.op_specs import SPECS
from ..graph.ops import PLUGIN_NAMESPACE
from . import trt_aot

_lock = threading.Lock()
_done = False


def register_aot(trt) -> None:
    global _done
    with _lock:
        if _done:
            return
        try:
            import tensorrt.plugin as trtp
        except ImportError as error:
            raise RuntimeError(f"plugins='aot' needs datacenter TensorRT's tensorrt.plugin (>= 10.10); "
                               f"{trt.__name__} {trt.__version__} has none: build with plugins='python'") from error
        if not hasattr(trtp, "aot_impl"):
            raise RuntimeError(f"TensorRT {trt.__version__} has no tensorrt.plugin.aot_impl (needs >= 10.10); "
                               "build with plugins='python'")
        registry = trt.get_plugin_registry()
        for creator in list(registry.all_creators):
            if getattr(creator, "plugin_namespace", None) == PLUGIN_NAMESPACE and creator.name in trt_aot.AOT_OPS:
                registry.deregister_creator(creator)
        _define(trt, trtp)
        _done = True


def _head_dim(expr, what: str) -> int:
    """A build-time constant dimension (the PTX is specialised on it)."""
    if isinstance(expr, int):
        return expr
    if not expr.is_constant:
        raise ValueError(f"{what} must be a build-time constant for the AOT kernel")
    return int(expr.constant_value())


def _dtype_name(trt, dtype) -> str:
    names = {trt.float32: "fp32", trt.float16: "fp16"}
    if dtype not in names:
        raise ValueError(f"no AOT kernel for dtype {dtype}")
    return names[dtype]


def _aot_result(trtp, plan):
    """What @trtp.aot_impl returns: (kernel name, PTX, launch parameters, int32 extra arguments)."""
    kernel = trt_aot.compile_plan(plan)
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = plan.grid
    params.block_x = kernel.num_warps * 32  # Triton's CTA: num_warps warps of 32 threads
    params.shared_mem = kernel.shared
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in plan.extra_args])
    return kernel.name.encode(), kernel.ptx.encode(), params, extra


def _define(trt, trtp) -> None:
    assert set(trt_aot.AOT_OPS) <= set(SPECS)
    F32 = trt.float32
    ids = {op: f"{PLUGIN_NAMESPACE}::{op}" for op in trt_aot.AOT_OPS}

    @trtp.register(ids["StacAttention"])
    def attention_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, key_bias: trtp.TensorDesc,
                       key_valid: trtp.TensorDesc, need_mass: int) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        qs, ks, vs = q.shape_expr, k.shape_expr, v.shape_expr
        return (trtp.from_shape_expr((qs[0], qs[1], qs[2], vs[3]), dtype=q.dtype),
                trtp.from_shape_expr((ks[0], ks[1], ks[2]), dtype=F32))

    @trtp.aot_impl(ids["StacAttention"])
    def attention_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, key_bias: trtp.TensorDesc,
                      key_valid: trtp.TensorDesc, need_mass: int, outputs: Tuple[trtp.TensorDesc]):
        head_dim = _head_dim(q.shape_expr[3], "StacAttention q head dim")
        if _head_dim(v.shape_expr[3], "StacAttention v head dim") != head_dim:
            raise ValueError("StacAttention AOT kernel needs q, k and v with the same head dim")
        plan = trt_aot.attention_plan(q.shape_expr, k.shape_expr, _dtype_name(trt, q.dtype), int(need_mass), head_dim,
                                      trtp.cdiv)
        return _aot_result(trtp, plan)

    @trtp.register(ids["StacScoreDecay"])
    def score_decay_desc(hot_score: trtp.TensorDesc, hot_len: trtp.TensorDesc, mass: trtp.TensorDesc,
                         ret_valid: trtp.TensorDesc, gamma: float) -> trtp.TensorDesc:
        s, m, r = hot_score.shape_expr, mass.shape_expr, ret_valid.shape_expr
        return trtp.from_shape_expr((s[0], s[1], s[2], m[3] - r[3]), dtype=F32)

    @trtp.aot_impl(ids["StacScoreDecay"])
    def score_decay_aot(hot_score: trtp.TensorDesc, hot_len: trtp.TensorDesc, mass: trtp.TensorDesc,
                        ret_valid: trtp.TensorDesc, gamma: float, outputs: Tuple[trtp.TensorDesc]):
        plan = trt_aot.score_decay_plan(hot_score.shape_expr, mass.shape_expr, ret_valid.shape_expr, float(gamma),
                                        trtp.cdiv)
        return _aot_result(trtp, plan)
