"""ONNX side of the ``stac::`` custom ops: operator schemas (domain ``stac``, version 1) and the
translation of each torch op into one node for the dynamo exporter's ``custom_translation_table``.

Every node carries ``plugin_namespace="stac"`` and ``plugin_version="1"`` so TensorRT's ONNX parser
falls back to the plugin named by its op_type (``trt_plugins``). The schemas are registered
with ``onnx.defs`` so onnxscript can build the nodes and ``onnx.checker`` can validate them; they
also document every input, output and attribute.
"""

from __future__ import annotations

import onnx
import torch
from onnx.defs import OpSchema

from .op_specs import POOL_INPUTS, SPECS  # noqa: F401 - re-exported for the runtimes
from .ops import PLUGIN_NAMES, PLUGIN_NAMESPACE, PLUGIN_VERSION

DOMAIN = "stac"
VERSION = 1
_TYPES = {
    "F": ["tensor(float)"],
    "I32": ["tensor(int32)"],
    "I64": ["tensor(int64)"],
    "B": ["tensor(bool)"],
}
_A = OpSchema.AttrType


def _schema(op_type: str) -> OpSchema:
    doc, inputs, outputs, attrs = SPECS[op_type]
    used = sorted({t for _, t in inputs + outputs})
    F = OpSchema.FormalParameter
    attributes = [OpSchema.Attribute(n, getattr(_A, t), d, required=False) for n, t, d in attrs]
    attributes += [
        OpSchema.Attribute("plugin_namespace", _A.STRING, "TensorRT plugin namespace", required=False),
        OpSchema.Attribute("plugin_version", _A.STRING, "TensorRT plugin version", required=False),
        # set to 1 only in the engine build's copy of the graph (trt_build.mark_aot_nodes)
        OpSchema.Attribute("aot", _A.INT, "1: TensorRT uses the plugin's AOT implementation", required=False),
    ]
    return OpSchema(
        op_type, DOMAIN, VERSION, doc=doc,
        inputs=[F(n, "T" + t) for n, t in inputs],
        outputs=[F(n, "T" + t) for n, t in outputs],
        type_constraints=[("T" + t, _TYPES[t], t) for t in used],
        attributes=attributes,
    )


def register_schemas() -> None:
    for op_type in SPECS:
        try:
            onnx.defs.get_schema(op_type, VERSION, DOMAIN)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(_schema(op_type))


def translation_table() -> dict:
    """torch op overload -> onnxscript function emitting the ``stac`` node (for torch.onnx.export)."""
    register_schemas()
    import onnxscript

    op = onnxscript.values.Opset(DOMAIN, VERSION)
    plugin = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}

    def attention(q, k, v, key_bias, key_valid, need_mass: int):
        return op.StacAttention(q, k, v, key_bias, key_valid, need_mass=need_mass, **plugin)

    def score_decay(hot_score, hot_len, mass, ret_valid, gamma: float):
        return op.StacScoreDecay(hot_score, hot_len, mass, ret_valid, gamma=gamma, **plugin)

    def topk_keep(hot_k, hot_v, hot_frame, hot_index, hot_pos, hot_len, new_k, new_v, score, world_points,
                  world_points_conf, frame_offset, window: int, hh: int, pinned_frames, patch_size: int,
                  patch_start_idx: int, conf_threshold: float, track_positions: int):
        return op.StacTopKKeep(
            hot_k, hot_v, hot_frame, hot_index, hot_pos, hot_len, new_k, new_v, score, world_points, world_points_conf,
            frame_offset, window=window, hh=hh, pinned_frames=list(pinned_frames), patch_size=patch_size,
            patch_start_idx=patch_start_idx, conf_threshold=conf_threshold, track_positions=track_positions, **plugin)

    def pool_update(piv_k, piv_v, piv_w, piv_s, piv_c, buf_k, buf_v, buf_s, buf_n, car_k, car_v, car_s, car_n,
                    row_key, row_last_used, ev_k, ev_v, ev_score, ev_pos, ev_len, steps, voxel_size: float, merge_cos: float, score_gate: float):
        return op.StacVoxelPoolUpdate(
            piv_k, piv_v, piv_w, piv_s, piv_c, buf_k, buf_v, buf_s, buf_n, car_k, car_v, car_s, car_n, row_key,
            row_last_used,
            ev_k, ev_v, ev_score, ev_pos, ev_len, steps, voxel_size=voxel_size, merge_cos=merge_cos,
            score_gate=score_gate, **plugin)

    def retrieve(piv_k, piv_v, piv_w, piv_s, piv_c, buf_k, buf_v, buf_s, buf_n, car_k, car_v, car_s, car_n,
                 row_key, row_last_used, hot_frame, hot_pos, hot_len, ret_k, ret_v, ret_bias, ret_valid, steps, latest_frame,
                 window: int, retrieval: int, retrieval_start_frame: int, refresh_steps: int, radius: int,
                 include_buffer: int, voxel_size: float):
        return op.StacRetrieve(
            piv_k, piv_v, piv_w, piv_s, piv_c, buf_k, buf_v, buf_s, buf_n, car_k, car_v, car_s, car_n, row_key,
            row_last_used,
            hot_frame, hot_pos, hot_len, ret_k, ret_v, ret_bias, ret_valid, steps, latest_frame,
            window=window, retrieval=retrieval, retrieval_start_frame=retrieval_start_frame,
            refresh_steps=refresh_steps, radius=radius, include_buffer=include_buffer, voxel_size=voxel_size, **plugin)

    fns = {"attention": attention, "score_decay": score_decay, "topk_keep": topk_keep, "pool_update": pool_update,
           "retrieve": retrieve}
    assert set(fns) == set(PLUGIN_NAMES)
    return {getattr(torch.ops.stac, name).default: fn for name, fn in fns.items()}
