"""Every ``stac`` op's interface, in one table that the ONNX schemas, the ONNX Runtime ops and the
TensorRT plugins are all generated from (no onnx or tensorrt import here).

``SPECS[op_type] = (doc, inputs, outputs, attributes)``: inputs / outputs are ``(name, type)`` with
type ``F`` (float32), ``I32``, ``I64`` or ``B`` (bool); attributes are ``(name, kind, doc)`` with kind
``INT``, ``FLOAT`` or ``INTS`` (ONNX attribute types).
"""

from __future__ import annotations

# the voxel pool's tensors (VoxelPool.state_specs order): pivots, buffers, carried-over tokens, table
POOL_INPUTS = ("piv_k", "piv_v", "piv_w", "piv_s", "piv_c", "buf_k", "buf_v", "buf_s", "buf_n",
               "car_k", "car_v", "car_s", "car_n", "row_key", "row_last_used")
_POOL_TYPES = ("F", "F", "F", "F", "F", "F", "F", "F", "I32", "F", "F", "F", "I32", "I64", "I64")


# op_type -> (doc, inputs [(name, type)], outputs [(name, type)], attributes [(name, type, doc)])
SPECS: dict[str, tuple] = {
    "StacAttention": (
        "Softmax attention of q over keys with an additive per-key logit bias and a key mask; also returns "
        "each key's probability mass summed over the queries (zeros when need_mass=0).",
        [("q", "F"), ("k", "F"), ("v", "F"), ("key_bias", "F"), ("key_valid", "B")],
        [("out", "F"), ("mass", "F")],
        [("need_mass", "INT", "1: compute the per-key mass")],
    ),
    "StacScoreDecay": (
        "Decayed cumulative attention score per cached token: S <- gamma S + mass * live / queries; new tokens get "
        "their first score. Output [B, L, H, Ns + M]: old tokens (first hot_len of Ns), then the M new ones.",
        [("hot_score", "F"), ("hot_len", "I64"), ("mass", "F"), ("ret_valid", "B")],
        [("score", "F")],
        [("gamma", "FLOAT", "decay per step")],
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
        [("window", "INT", "recent frames always kept"), ("hh", "INT", "heavy-hitter frame-equivalents"),
         ("pinned_frames", "INTS", "frames always kept"), ("patch_size", "INT", "pixels per patch side"),
         ("patch_start_idx", "INT", "special tokens per frame"), ("conf_threshold", "FLOAT", "position confidence bar"),
         ("track_positions", "INT", "1: attach world positions (stac)")],
    ),
    "StacVoxelPoolUpdate": (
        "Insert each layer's evicted tokens into the per-stream voxel pool (buffers, carried-over tokens, pivots, "
        "sibling merges, least-recently-used voxel eviction at the cap).",
        [(f"{n}", t) for n, t in zip(POOL_INPUTS, _POOL_TYPES)]
        + [("ev_k", "F"), ("ev_v", "F"), ("ev_score", "F"), ("ev_pos", "F"), ("ev_len", "I64"), ("steps", "I64")],
        [(f"{n}_out", t) for n, t in zip(POOL_INPUTS, _POOL_TYPES)],
        [("voxel_size", "FLOAT", "voxel edge"), ("merge_cos", "FLOAT", "merge threshold"),
         ("score_gate", "FLOAT", "buffer admission gate")],
    ),
    "StacRetrieve": (
        "Every refresh_steps steps from retrieval_start_frame on: pivots (bias log C) and buffered tokens (bias 0) of "
        "the voxels near the recent window, per (layer, head); otherwise the previous retrieved tokens pass through.",
        [(f"{n}", t) for n, t in zip(POOL_INPUTS, _POOL_TYPES)]
        + [("hot_frame", "I32"), ("hot_pos", "F"), ("hot_len", "I64"), ("ret_k", "F"), ("ret_v", "F"), ("ret_bias", "F"),
           ("ret_valid", "B"), ("steps", "I64"), ("latest_frame", "I64")],
        [("ret_k_out", "F"), ("ret_v_out", "F"), ("ret_bias_out", "F"), ("ret_valid_out", "B"), ("row_last_used_out", "I64")],
        [("window", "INT", "recent frames"), ("retrieval", "INT", "frame-equivalents retrieved"),
         ("retrieval_start_frame", "INT", "first frame count with retrieval"), ("refresh_steps", "INT", "cadence"),
         ("radius", "INT", "Chebyshev voxel radius"), ("include_buffer", "INT", "1: also buffered raw tokens"),
         ("voxel_size", "FLOAT", "voxel edge")],
    ),
}
