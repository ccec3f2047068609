"""The ``stac`` ops as TensorRT plugins (quickly deployable plugins, ``tensorrt.plugin``, TRT >= 10.7).

NOT EXERCISED HERE: TensorRT cannot be installed on the project's machines (docs/export.md); the
tests that use this module skip without ``tensorrt``. It is written against the documented QDP
API and runs where TensorRT is present (the NGC Triton container of docker-compose's prepare step).

Plugin ids are ``stac::<op_type>`` (namespace ``stac``, version 1): the ONNX parser falls back to
them for the exported graph's ``stac`` nodes, matching op_type to the plugin name and
``plugin_namespace`` to the namespace. ``register()`` must run before parsing or deserializing.

Each plugin has:
- a shape description (``@trtp.register``): every output shape is an expression of input shapes
  (the state budgets are fixed-size tensors), so no data-dependent shapes;
- a JIT implementation (``@trtp.impl``): the inputs as torch CUDA tensors on TensorRT's stream,
  the same ``ops.*_impl`` functions the torch engine, the ONNX Runtime ops and the torch
  functional step run (StacAttention uses the engine's fused OpenAI-Triton kernel on CUDA when
  available, like the engine itself). An engine with JIT plugins needs Python and these
  definitions in the process that runs it: ``stac_backend.export.trt_runtime`` (e.g. inside the
  Triton Python backend) - not Triton's C++ tensorrt backend.

AOT implementations (``@trtp.aot_impl``, TensorRT >= 10.10) for ``StacAttention`` and
``StacScoreDecay``: Triton kernels compiled to PTX while the engine is built (``trt_aot``), baked
into the engine and launched by TensorRT itself - no Python at run time. TensorRT uses a node's AOT
implementation only when the ONNX node carries ``aot=1``; ``trt_build.build_engine(plugins="aot")``
marks the nodes of ``trt_aot.AOT_OPS`` in a copy of the graph, ``plugins="jit"`` keeps every op on
the JIT path (the fallback). ``StacTopKKeep``, ``StacVoxelPoolUpdate`` and ``StacRetrieve`` are
JIT-only (control-heavy: sorting, voxel tables, per-row merge rounds), so only the ``full`` graph
(StacAttention nodes only) gives an engine without Python callbacks; see docs/export.md.
"""

# No `from __future__ import annotations`: tensorrt.plugin reads these functions' type hints.
import threading
from typing import Tuple

import numpy as np

from . import ops

_lock = threading.Lock()
_registered = False

PLUGIN_IDS = {op_type: f"{ops.PLUGIN_NAMESPACE}::{op_type}" for op_type in ops.PLUGIN_NAMES.values()}


def _attention(q, k, v, bias, valid, need_mass: int):
    """The engine's attention dispatch: the fused kernel on CUDA (if available), else the reference."""
    if q.is_cuda:
        from ..cache.key_sets import _attention_with_mass

        out, mass = _attention_with_mass(q, k, v, bias, valid, bool(need_mass))
        if mass is None:
            import torch

            mass = torch.zeros(k.shape[:3], dtype=torch.float32, device=k.device)
        return out, mass
    return ops.attention_impl(q, k, v, bias, valid, need_mass)


def register() -> None:
    """Register the five plugins with TensorRT's plugin registry (once per process), with the AOT
    implementations where this TensorRT has ``tensorrt.plugin.aot_impl`` (>= 10.10)."""
    global _registered
    with _lock:
        if _registered:
            return
        _define()
        import tensorrt.plugin as trtp

        if hasattr(trtp, "aot_impl"):
            _define_aot(trtp)
        _registered = True


def _head_dim(expr, what: str) -> int:
    """A build-time constant dimension (the PTX is specialised on it)."""
    if isinstance(expr, int):
        return expr
    if not expr.is_constant:
        raise ValueError(f"{what} must be a build-time constant for the AOT kernel")
    return int(expr.constant_value())


def _dtype_name(dtype) -> str:
    import tensorrt as trt

    names = {trt.float32: "fp32", trt.float16: "fp16"}
    if dtype not in names:
        raise ValueError(f"no AOT kernel for dtype {dtype}")
    return names[dtype]


def _aot_result(trtp, plan):
    """What @trtp.aot_impl returns: (kernel name, PTX, launch parameters, int32 extra arguments)."""
    from . import trt_aot

    kernel = trt_aot.compile_plan(plan)
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = plan.grid
    params.block_x = kernel.num_warps * 32  # Triton's CTA: num_warps warps of 32 threads
    params.shared_mem = kernel.shared
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in plan.extra_args])
    return kernel.name.encode(), kernel.ptx.encode(), params, extra


def _define_aot(trtp) -> None:
    """AOT implementations; attributes a kernel needs become compile-time constants of its PTX
    (TensorRT does not serialize the attributes of an AOT plugin)."""
    from . import trt_aot

    @trtp.aot_impl(PLUGIN_IDS["StacAttention"])
    def attention_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, key_bias: trtp.TensorDesc,
                      key_valid: trtp.TensorDesc, need_mass: int, outputs: Tuple[trtp.TensorDesc]):
        head_dim = _head_dim(q.shape_expr[3], "StacAttention q head dim")
        if _head_dim(v.shape_expr[3], "StacAttention v head dim") != head_dim:
            raise ValueError("StacAttention AOT kernel needs q, k and v with the same head dim")
        plan = trt_aot.attention_plan(q.shape_expr, k.shape_expr, _dtype_name(q.dtype), int(need_mass), head_dim,
                                      trtp.cdiv)
        return _aot_result(trtp, plan)

    @trtp.aot_impl(PLUGIN_IDS["StacScoreDecay"])
    def score_decay_aot(hot_score: trtp.TensorDesc, hot_len: trtp.TensorDesc, mass: trtp.TensorDesc,
                        ret_valid: trtp.TensorDesc, gamma: float, outputs: Tuple[trtp.TensorDesc]):
        plan = trt_aot.score_decay_plan(hot_score.shape_expr, mass.shape_expr, ret_valid.shape_expr, float(gamma),
                                        trtp.cdiv)
        return _aot_result(trtp, plan)


def _define() -> None:  # noqa: C901 - one block per plugin
    import numpy.typing as npt
    import tensorrt as trt
    import tensorrt.plugin as trtp
    import torch

    F32, I64 = trt.float32, trt.int64

    def shape(*dims):
        return tuple(dims)

    def torch_views(stream, tensors):
        return [torch.as_tensor(t, device="cuda") for t in tensors]

    def write(outputs, values):
        for out, value in zip(outputs, values):
            torch.as_tensor(out, device="cuda").copy_(value.reshape(tuple(out.shape)))

    # ------------------------------------------------------------------ StacAttention
    @trtp.register(PLUGIN_IDS["StacAttention"])
    def attention_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, key_bias: trtp.TensorDesc,
                       key_valid: trtp.TensorDesc, need_mass: int) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        qs, ks, vs = q.shape_expr, k.shape_expr, v.shape_expr
        out = trtp.from_shape_expr(shape(qs[0], qs[1], qs[2], vs[3]), dtype=q.dtype)
        mass = trtp.from_shape_expr(shape(ks[0], ks[1], ks[2]), dtype=F32)
        return out, mass

    @trtp.impl(PLUGIN_IDS["StacAttention"])
    def attention_run(q, k, v, key_bias, key_valid, need_mass: int, outputs, stream) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            t = torch_views(stream, (q, k, v, key_bias, key_valid))
            write(outputs, _attention(*t, int(need_mass)))

    # ------------------------------------------------------------------ StacScoreDecay
    @trtp.register(PLUGIN_IDS["StacScoreDecay"])
    def score_decay_desc(hot_score: trtp.TensorDesc, hot_len: trtp.TensorDesc, mass: trtp.TensorDesc,
                         ret_valid: trtp.TensorDesc, gamma: float) -> trtp.TensorDesc:
        s, m, r = hot_score.shape_expr, mass.shape_expr, ret_valid.shape_expr
        return trtp.from_shape_expr(shape(s[0], s[1], s[2], m[3] - r[3]), dtype=F32)

    @trtp.impl(PLUGIN_IDS["StacScoreDecay"])
    def score_decay_run(hot_score, hot_len, mass, ret_valid, gamma: float, outputs, stream) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            write(outputs, [ops.score_decay_impl(*torch_views(stream, (hot_score, hot_len, mass, ret_valid)), float(gamma))])

    # ------------------------------------------------------------------ StacTopKKeep
    @trtp.register(PLUGIN_IDS["StacTopKKeep"])
    def topk_keep_desc(hot_k: trtp.TensorDesc, hot_v: trtp.TensorDesc, hot_frame: trtp.TensorDesc,
                       hot_index: trtp.TensorDesc, hot_pos: trtp.TensorDesc, hot_len: trtp.TensorDesc,
                       new_k: trtp.TensorDesc, new_v: trtp.TensorDesc, score: trtp.TensorDesc,
                       world_points: trtp.TensorDesc, world_points_conf: trtp.TensorDesc, frame_offset: trtp.TensorDesc,
                       window: int, hh: int, pinned_frames: npt.NDArray[np.int32], patch_size: int, patch_start_idx: int,
                       conf_threshold: float, track_positions: int) -> Tuple[trtp.TensorDesc]:
        h, n = hot_k.shape_expr, new_k.shape_expr
        return (
            hot_k.like(), hot_v.like(), hot_frame.like(), hot_index.like(),
            trtp.from_shape_expr(shape(h[0], h[1], h[2], h[3]), dtype=F32), hot_pos.like(), hot_len.like(),
            trtp.from_shape_expr(shape(n[0], n[1], n[2], n[3], n[4]), dtype=F32),
            trtp.from_shape_expr(shape(n[0], n[1], n[2], n[3], n[4]), dtype=F32),
            trtp.from_shape_expr(shape(n[0], n[1], n[2], n[3]), dtype=F32),
            trtp.from_shape_expr(shape(n[0], n[1], n[2], n[3], 3), dtype=F32),
            trtp.from_shape_expr(shape(n[0], n[1]), dtype=I64),
        )

    @trtp.impl(PLUGIN_IDS["StacTopKKeep"])
    def topk_keep_run(hot_k, hot_v, hot_frame, hot_index, hot_pos, hot_len, new_k, new_v, score, world_points,
                      world_points_conf, frame_offset, window: int, hh: int, pinned_frames: npt.NDArray[np.int32],
                      patch_size: int, patch_start_idx: int, conf_threshold: float, track_positions: int,
                      outputs, stream) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            t = torch_views(stream, (hot_k, hot_v, hot_frame, hot_index, hot_pos, hot_len, new_k, new_v, score,
                                     world_points, world_points_conf, frame_offset))
            write(outputs, ops.topk_keep_impl(*t, int(window), int(hh), [int(f) for f in pinned_frames], int(patch_size),
                                              int(patch_start_idx), float(conf_threshold), int(track_positions)))

    # ------------------------------------------------------------------ StacVoxelPoolUpdate
    @trtp.register(PLUGIN_IDS["StacVoxelPoolUpdate"])
    def pool_update_desc(piv_k: trtp.TensorDesc, piv_v: trtp.TensorDesc, piv_w: trtp.TensorDesc, piv_s: trtp.TensorDesc,
                         piv_c: trtp.TensorDesc, buf_k: trtp.TensorDesc, buf_v: trtp.TensorDesc, buf_s: trtp.TensorDesc,
                         buf_n: trtp.TensorDesc, row_key: trtp.TensorDesc, row_last_used: trtp.TensorDesc,
                         ev_k: trtp.TensorDesc, ev_v: trtp.TensorDesc, ev_score: trtp.TensorDesc, ev_pos: trtp.TensorDesc,
                         ev_len: trtp.TensorDesc, steps: trtp.TensorDesc, voxel_size: float, merge_cos: float,
                         score_gate: float) -> Tuple[trtp.TensorDesc]:
        return tuple(t.like() for t in (piv_k, piv_v, piv_w, piv_s, piv_c, buf_k, buf_v, buf_s, buf_n, row_key, row_last_used))

    @trtp.impl(PLUGIN_IDS["StacVoxelPoolUpdate"])
    def pool_update_run(piv_k, piv_v, piv_w, piv_s, piv_c, buf_k, buf_v, buf_s, buf_n, row_key, row_last_used,
                        ev_k, ev_v, ev_score, ev_pos, ev_len, steps, voxel_size: float, merge_cos: float,
                        score_gate: float, outputs, stream) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            pool = torch_views(stream, (piv_k, piv_v, piv_w, piv_s, piv_c, buf_k, buf_v, buf_s, buf_n, row_key, row_last_used))
            rest = torch_views(stream, (ev_k, ev_v, ev_score, ev_pos, ev_len, steps))
            write(outputs, ops.pool_update_impl(pool, *rest, float(voxel_size), float(merge_cos), float(score_gate)))

    # ------------------------------------------------------------------ StacRetrieve
    @trtp.register(PLUGIN_IDS["StacRetrieve"])
    def retrieve_desc(piv_k: trtp.TensorDesc, piv_v: trtp.TensorDesc, piv_w: trtp.TensorDesc, piv_s: trtp.TensorDesc,
                      piv_c: trtp.TensorDesc, buf_k: trtp.TensorDesc, buf_v: trtp.TensorDesc, buf_s: trtp.TensorDesc,
                      buf_n: trtp.TensorDesc, row_key: trtp.TensorDesc, row_last_used: trtp.TensorDesc,
                      hot_frame: trtp.TensorDesc, hot_pos: trtp.TensorDesc, hot_len: trtp.TensorDesc,
                      ret_k: trtp.TensorDesc, ret_v: trtp.TensorDesc, ret_bias: trtp.TensorDesc, ret_valid: trtp.TensorDesc,
                      steps: trtp.TensorDesc, latest_frame: trtp.TensorDesc, window: int, retrieval: int,
                      retrieval_start_frame: int, refresh_steps: int, radius: int, include_buffer: int,
                      voxel_size: float) -> Tuple[trtp.TensorDesc]:
        return ret_k.like(), ret_v.like(), ret_bias.like(), ret_valid.like(), row_last_used.like()

    @trtp.impl(PLUGIN_IDS["StacRetrieve"])
    def retrieve_run(piv_k, piv_v, piv_w, piv_s, piv_c, buf_k, buf_v, buf_s, buf_n, row_key, row_last_used,
                     hot_frame, hot_pos, hot_len, ret_k, ret_v, ret_bias, ret_valid, steps, latest_frame,
                     window: int, retrieval: int, retrieval_start_frame: int, refresh_steps: int, radius: int,
                     include_buffer: int, voxel_size: float, outputs, stream) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            pool = torch_views(stream, (piv_k, piv_v, piv_w, piv_s, piv_c, buf_k, buf_v, buf_s, buf_n, row_key, row_last_used))
            rest = torch_views(stream, (hot_frame, hot_pos, hot_len, ret_k, ret_v, ret_bias, ret_valid, steps, latest_frame))
            write(outputs, ops.retrieve_impl(pool, *rest, int(window), int(retrieval), int(retrieval_start_frame),
                                             int(refresh_steps), int(radius), int(include_buffer), float(voxel_size)))

