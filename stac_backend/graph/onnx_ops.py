"""ONNX side of the ``stac::`` custom ops: operator schemas (domain ``stac``, version 1) and the
translation of each torch op into one node for the dynamo exporter's ``custom_translation_table``.

Every node carries ``plugin_namespace="stac"`` and ``plugin_version="1"`` so TensorRT's ONNX parser
falls back to the plugin named by its op_type (``plugins/tensorrt``). The schemas are registered
with ``onnx.defs`` so onnxscript can build the nodes and ``onnx.checker`` can validate them; they
also document every input, output and attribute.
"""

from __future__ import annotations

import onnx
import torch
from onnx.defs import OpSchema

from .ops import PLUGIN_NAMES, PLUGIN_NAMESPACE, PLUGIN_VERSION

DOMAIN = "stac"
VERSION = 1
POOL_INPUTS = ("piv_k", "piv_v", "piv_w", "piv_s", "piv_c", "buf_k", "buf_v", "buf_s", "buf_n", "row_key", "row_last_used")
_POOL_TYPES = ("F", "F", "F", "F", "F", "F", "F", "F", "I32", "I64", "I64")

_TYPES = {
    "F": ["tensor(float)"],
    "I32": ["tensor(int32)"],
    "I64": ["tensor(int64)"],
    "B": ["tensor(bool)"],
}
_A = OpSchema.AttrType

# op_type -> (doc, inputs [(name, type)], outputs [(name, type)], attributes [(name, type, doc)])
SPECS: dict[str, tuple] = {
    "StacAttention": (
        "Softmax attention of q over keys with an additive per-key logit bias and a key mask; also returns "
        "each key's probability mass summed over the queries (zeros when need_mass=0).",
        [("q", "F"), ("k", "F"), ("v", "F"), ("key_bias", "F"), ("key_valid", "B")],
        [("out", "F"), ("mass", "F")],
        [("need_mass", _A.INT, "1: compute the per-key mass")],
    ),
    "StacScoreDecay": (
        "Decayed cumulative attention score per cached token: S <- gamma S + mass * live / queries; new tokens get "
        "their first score. Output [B, L, H, Ns + M]: old tokens (first hot_len of Ns), then the M new ones.",
        [("hot_score", "F"), ("hot_len", "I64"), ("mass", "F"), ("ret_valid", "B")],
        [("score", "F")],
        [("gamma", _A.FLOAT, "decay per step")],
    ),
    "StacTopKKeep": (
        "Append the step's tokens to the hot store (with world positions when track_positions), keep pinned + "
        "window frames and the top hh frame-equivalents by score per (layer, head); emit the evicted tokens.",
        [("hot_k", "F"), ("hot_v", "F"), ("hot_frame", "I32"), ("hot_index", "I32"), ("hot_pos", "F"), ("hot_len", "I64"),
         ("new_k", "F"), ("new_v", "F"), ("score", "F"), ("world_points", "F"), ("world_points_conf", "F"),
         ("frame_offset", "I64")],
        [("hot_k_out", "F"), ("hot_v_out", "F"), ("hot_frame_out", "I32"), ("hot_index_out", "I32"), ("hot_score_out", "F"),
         ("hot_pos_out", "F"), ("hot_len_out", "I64"), ("ev_k", "F"), ("ev_v", "F"), ("ev_score", "F"), ("ev_pos", "F"),
         ("ev_len", "I64")],
        [("window", _A.INT, "recent frames always kept"), ("hh", _A.INT, "heavy-hitter frame-equivalents"),
         ("pinned_frames", _A.INTS, "frames always kept"), ("patch_size", _A.INT, "pixels per patch side"),
         ("patch_start_idx", _A.INT, "special tokens per frame"), ("conf_threshold", _A.FLOAT, "position confidence bar"),
         ("track_positions", _A.INT, "1: attach world positions (stac)")],
    ),
    "StacVoxelPoolUpdate": (
        "Insert each layer's evicted tokens into the per-stream voxel pool (buffers, pivots, sibling merges, "
        "least-recently-used voxel eviction at the cap).",
        [(f"{n}", t) for n, t in zip(POOL_INPUTS, _POOL_TYPES)]
        + [("ev_k", "F"), ("ev_v", "F"), ("ev_score", "F"), ("ev_pos", "F"), ("ev_len", "I64"), ("steps", "I64")],
        [(f"{n}_out", t) for n, t in zip(POOL_INPUTS, _POOL_TYPES)],
        [("voxel_size", _A.FLOAT, "voxel edge"), ("merge_cos", _A.FLOAT, "merge threshold"),
         ("score_gate", _A.FLOAT, "buffer admission gate")],
    ),
    "StacRetrieve": (
        "Every refresh_steps steps from retrieval_start_frame on: pivots (bias log C) and buffered tokens (bias 0) of "
        "the voxels near the recent window, per (layer, head); otherwise the previous retrieved tokens pass through.",
        [(f"{n}", t) for n, t in zip(POOL_INPUTS, _POOL_TYPES)]
        + [("hot_frame", "I32"), ("hot_pos", "F"), ("hot_len", "I64"), ("ret_k", "F"), ("ret_v", "F"), ("ret_bias", "F"),
           ("ret_valid", "B"), ("steps", "I64"), ("latest_frame", "I64")],
        [("ret_k_out", "F"), ("ret_v_out", "F"), ("ret_bias_out", "F"), ("ret_valid_out", "B"), ("row_last_used_out", "I64")],
        [("window", _A.INT, "recent frames"), ("retrieval", _A.INT, "frame-equivalents retrieved"),
         ("retrieval_start_frame", _A.INT, "first frame count with retrieval"), ("refresh_steps", _A.INT, "cadence"),
         ("radius", _A.INT, "Chebyshev voxel radius"), ("include_buffer", _A.INT, "1: also buffered raw tokens"),
         ("voxel_size", _A.FLOAT, "voxel edge")],
    ),
}


def _schema(op_type: str) -> OpSchema:
    doc, inputs, outputs, attrs = SPECS[op_type]
    used = sorted({t for _, t in inputs + outputs})
    F = OpSchema.FormalParameter
    attributes = [OpSchema.Attribute(n, t, d, required=False) for n, t, d in attrs]
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

    def pool_update(piv_k, piv_v, piv_w, piv_s, piv_c, buf_k, buf_v, buf_s, buf_n, row_key, row_last_used,
                    ev_k, ev_v, ev_score, ev_pos, ev_len, steps, voxel_size: float, merge_cos: float, score_gate: float):
        return op.StacVoxelPoolUpdate(
            piv_k, piv_v, piv_w, piv_s, piv_c, buf_k, buf_v, buf_s, buf_n, row_key, row_last_used,
            ev_k, ev_v, ev_score, ev_pos, ev_len, steps, voxel_size=voxel_size, merge_cos=merge_cos,
            score_gate=score_gate, **plugin)

    def retrieve(piv_k, piv_v, piv_w, piv_s, piv_c, buf_k, buf_v, buf_s, buf_n, row_key, row_last_used,
                 hot_frame, hot_pos, hot_len, ret_k, ret_v, ret_bias, ret_valid, steps, latest_frame,
                 window: int, retrieval: int, retrieval_start_frame: int, refresh_steps: int, radius: int,
                 include_buffer: int, voxel_size: float):
        return op.StacRetrieve(
            piv_k, piv_v, piv_w, piv_s, piv_c, buf_k, buf_v, buf_s, buf_n, row_key, row_last_used,
            hot_frame, hot_pos, hot_len, ret_k, ret_v, ret_bias, ret_valid, steps, latest_frame,
            window=window, retrieval=retrieval, retrieval_start_frame=retrieval_start_frame,
            refresh_steps=refresh_steps, radius=radius, include_buffer=include_buffer, voxel_size=voxel_size, **plugin)

    fns = {"attention": attention, "score_decay": score_decay, "topk_keep": topk_keep, "pool_update": pool_update,
           "retrieve": retrieve}
    assert set(fns) == set(PLUGIN_NAMES)
    return {getattr(torch.ops.stac, name).default: fn for name, fn in fns.items()}
