"""The ``stac`` ops as TensorRT plugins: IPluginV3 classes with IPluginCreatorV3One creators, written
once against the API that ``tensorrt`` and ``tensorrt_rtx`` share (``graph.tensorrt.load``).

    from stac_backend.graph.trt_plugins import register
    register()      # before parsing an exported graph or deserializing an engine built from one

Each op of ``op_specs.SPECS`` becomes one plugin: name = the ONNX op_type, namespace ``stac``,
version ``1``, so the ONNX parser of either package resolves every ``stac`` node to it. What
TensorRT calls while it builds an engine is implemented for real:

- creation from the node's attributes: every attribute of the op is required, any other is refused
  (``PluginConfigError`` naming the node, the attribute and the known ones);
- shape inference (``get_output_shapes``): every output dimension is an expression of input
  dimensions (the state budgets are fixed-size tensors: no data-dependent shape), after checking
  the rank of every input and that the dimensions several inputs share (batch, layers, heads,
  budgets, head dim, ...) agree wherever both are known - a wrongly shaped state input is refused;
- format support: linear layout and exactly the dtype of the op's schema at every position;
- serialisation: the attributes as plugin fields (``get_fields_to_serialize``), read back by the
  creator when an engine is deserialized.

Run-time ``enqueue`` wraps TensorRT's device buffers as torch CUDA tensors on TensorRT's stream
and runs the engine's own implementations (``IMPLEMENTATIONS``): StacAttention the fused
OpenAI-Triton attention-with-key-mass kernel (what the torch engine runs on CUDA), the other ops
the torch reference code of ``ops``. Every plugin here is Python, so an engine containing one runs
only in a process with Python and this module (``engine.runtimes.tensorrt_runtime``, e.g. behind
Triton's Python backend), never in Triton's C++ tensorrt backend.
"""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Any, Callable, Optional, Sequence

import numpy as np

from . import ops
from .op_specs import POOL_INPUTS, SPECS
from .tensorrt import load

PLUGIN_NAMESPACE = ops.PLUGIN_NAMESPACE
PLUGIN_VERSION = ops.PLUGIN_VERSION
PLUGIN_IDS = {op_type: f"{PLUGIN_NAMESPACE}::{op_type}" for op_type in SPECS}

#: how each op runs inside the engine, and whether that needs Python in the serving process
IMPLEMENTATIONS = {
    "StacAttention": ("fused OpenAI-Triton attention-with-key-mass kernel (CUDA), launched from Python", True),
    "StacScoreDecay": ("torch ops (ops.score_decay_impl)", True),
    "StacTopKKeep": ("torch ops (ops.topk_keep_impl)", True),
    "StacVoxelPoolUpdate": ("torch ops (ops.pool_update_impl)", True),
    "StacRetrieve": ("torch ops (ops.retrieve_impl)", True),
}


class PluginConfigError(ValueError):
    """A stac node or its inputs do not fit the plugin (names the node and the problem)."""


#: problems found by the plugins' callbacks while TensorRT parses or builds (the bindings only log
#: an exception raised in a callback; ``trt_build`` reports these with the parser's errors)
ERRORS: list[str] = []


# ----------------------------------------------------------------------------- shapes per op
# Ranks of each input (with the batch axis) and the dimensions several inputs must share: groups of
# (input index, axis). Output shapes: a list per output of dims, each ``(input, axis)``, an int, or
# ("sub", (input, axis), (input, axis)); ``("like", i)`` = every dim of input i.
_POOL_RANKS = (6, 6, 5, 5, 5, 6, 6, 5, 4, 6, 6, 5, 4, 2, 2)  # POOL_INPUTS
_NP = len(POOL_INPUTS)  # the ops' inputs after the pool's start at _NP


def _pool_groups(extra_layers=(), extra_heads=(), extra_dims=()):
    pool = range(_NP - 2)  # the (L, H, V, ...) tensors; row_key / row_last_used are [B, V]
    return {
        "layers": [(i, 1) for i in pool] + list(extra_layers),
        "heads": [(i, 2) for i in pool] + list(extra_heads),
        "voxels": [(i, 3) for i in pool] + [(_NP - 2, 1), (_NP - 1, 1)],
        "pivots": [(i, 4) for i in range(5)],
        "buffer": [(i, 4) for i in (5, 6, 7)],
        "carry slots": [(i, 4) for i in (9, 10, 11)],
        "head dim": [(0, 5), (1, 5), (5, 5), (6, 5), (9, 5), (10, 5)] + list(extra_dims),
    }


def _batch(n):
    return {"batch": [(i, 0) for i in range(n)]}


SHAPES: dict[str, dict[str, Any]] = {
    "StacAttention": {
        "ranks": (4, 4, 4, 3, 3),
        "groups": {**_batch(5), "heads": [(i, 1) for i in range(5)], "keys": [(i, 2) for i in range(1, 5)],
                   "head dim": [(0, 3), (1, 3)]},
        "outputs": [[(0, 0), (0, 1), (0, 2), (2, 3)], [(1, 0), (1, 1), (1, 2)]],
    },
    "StacScoreDecay": {
        "ranks": (4, 2, 4, 4),
        "groups": {**_batch(4), "layers": [(i, 1) for i in range(4)], "heads": [(0, 2), (2, 2), (3, 2)]},
        # [B, L, H, Ns + M] with M = mass - Ns - T: mass's last dim minus the retrieved budget
        "outputs": [[(0, 0), (0, 1), (0, 2), ("sub", (2, 3), (3, 3))]],
    },
    "StacTopKKeep": {
        "ranks": (5, 5, 4, 4, 5, 2, 5, 5, 4, 5, 4, 1),
        "groups": {**_batch(12), "layers": [(i, 1) for i in range(9)],
                   "heads": [(i, 2) for i in (0, 1, 2, 3, 4, 6, 7, 8)], "hot budget": [(i, 3) for i in range(5)],
                   "head dim": [(0, 4), (1, 4), (6, 4), (7, 4)], "new tokens": [(6, 3), (7, 3)],
                   "frames": [(9, 1), (10, 1)], "image height": [(9, 2), (10, 2)], "image width": [(9, 3), (10, 3)]},
        "constants": {(4, 4): 3, (9, 4): 3},
        "outputs": [("like", 0), ("like", 1), ("like", 2), ("like", 3), [(0, 0), (0, 1), (0, 2), (0, 3)],
                    ("like", 4), ("like", 5), ("like", 6), ("like", 6), [(6, 0), (6, 1), (6, 2), (6, 3)],
                    [(6, 0), (6, 1), (6, 2), (6, 3), 3], [(6, 0), (6, 1)]],
    },
    "StacVoxelPoolUpdate": {
        "ranks": _POOL_RANKS + (5, 5, 4, 5, 2, 2),
        "groups": {**_batch(_NP + 6), **_pool_groups(extra_layers=[(i, 1) for i in range(_NP, _NP + 5)],
                                                     extra_heads=[(i, 2) for i in range(_NP, _NP + 4)],
                                                     extra_dims=[(_NP, 4), (_NP + 1, 4)]),
                   "evicted": [(i, 3) for i in range(_NP, _NP + 4)]},
        "constants": {(_NP + 3, 4): 3},
        "outputs": [("like", i) for i in range(_NP)],
    },
    "StacRetrieve": {
        "ranks": _POOL_RANKS + (4, 5, 2, 5, 5, 4, 4, 2, 1),
        "groups": {**_batch(_NP + 9), **_pool_groups(extra_layers=[(i, 1) for i in range(_NP, _NP + 7)],
                                                     extra_heads=[(_NP + i, 2) for i in (0, 1, 3, 4, 5, 6)],
                                                     extra_dims=[(_NP + 3, 4), (_NP + 4, 4)]),
                   "hot budget": [(_NP, 3), (_NP + 1, 3)], "retrieved budget": [(_NP + i, 3) for i in (3, 4, 5, 6)]},
        "constants": {(_NP + 1, 4): 3},
        "outputs": [("like", _NP + 3), ("like", _NP + 4), ("like", _NP + 5), ("like", _NP + 6), ("like", _NP - 1)],
    },
}

_KINDS = {"INT": int, "FLOAT": float, "INTS": list}


def _dtype(trt: ModuleType, code: str):
    return {"F": trt.float32, "I32": trt.int32, "I64": trt.int64, "B": trt.bool}[code]


def parse_fields(op_type: str, node: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The op's attributes from plugin fields {name: array}: every one required, no other accepted."""
    known = {name: kind for name, kind, _ in SPECS[op_type][3]}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        hint = (" ('aot' marks a node for the ahead-of-time kernels of datacenter TensorRT's tensorrt.plugin; "
                "build with plugins='python')") if "aot" in unknown else ""
        raise PluginConfigError(f"{op_type} node {node!r}: unknown attribute(s) {unknown}; {op_type} takes "
                                f"{sorted(known)}{hint}")
    missing = sorted(set(known) - set(fields))
    if missing:
        raise PluginConfigError(f"{op_type} node {node!r}: missing attribute(s) {missing}")
    values = {}
    for name, kind in known.items():
        data = np.asarray(fields[name]).reshape(-1)
        if kind == "INTS":
            values[name] = [int(x) for x in data]
        elif data.size != 1:
            raise PluginConfigError(f"{op_type} node {node!r}: attribute {name} must be one {kind.lower()}, got {data}")
        else:
            values[name] = _KINDS[kind](data[0])
    return values


def check_input_dims(op_type: str, dims: Sequence[Sequence[Optional[int]]], node: str = "") -> None:
    """Refuse inputs of the wrong rank or whose shared dimensions disagree (None = not known yet)."""
    spec, inputs = SHAPES[op_type], SPECS[op_type][1]
    where = f"{op_type} node {node!r}" if node else op_type
    if len(dims) != len(spec["ranks"]):
        raise PluginConfigError(f"{where}: {len(dims)} inputs, expected {len(spec['ranks'])}")
    for (name, _), rank, shape in zip(inputs, spec["ranks"], dims):
        if len(shape) != rank:
            raise PluginConfigError(f"{where}: input {name} has rank {len(shape)} {list(shape)}, expected {rank}")
    for what, members in spec["groups"].items():
        seen = {(inputs[i][0], axis): dims[i][axis] for i, axis in members if dims[i][axis] is not None}
        if len(set(seen.values())) > 1:
            listing = ", ".join(f"{name}[{axis}]={value}" for (name, axis), value in seen.items())
            raise PluginConfigError(f"{where}: the {what} dimension differs between inputs: {listing}")
    for (i, axis), value in spec.get("constants", {}).items():
        if dims[i][axis] is not None and dims[i][axis] != value:
            raise PluginConfigError(f"{where}: input {inputs[i][0]} must have {value} at axis {axis}, got {dims[i][axis]}")


def output_dims(op_type: str, dims: Sequence[Sequence[Any]], sub: Callable[[Any, Any], Any]) -> list[list[Any]]:
    """Output shapes from input dims (ints or TensorRT expressions; ``sub`` subtracts two of them)."""
    out = []
    for rule in SHAPES[op_type]["outputs"]:
        if isinstance(rule, tuple) and rule[0] == "like":
            out.append(list(dims[rule[1]]))
            continue
        shape = []
        for d in rule:
            if isinstance(d, int):
                shape.append(d)
            elif d[0] == "sub":
                shape.append(sub(dims[d[1][0]][d[1][1]], dims[d[2][0]][d[2][1]]))
            else:
                shape.append(dims[d[0]][d[1]])
        out.append(shape)
    return out


# ----------------------------------------------------------------------------- run time
_TYPESTR = {"F": "<f4", "I32": "<i4", "I64": "<i8", "B": "|b1"}


class _DeviceArray:
    """A TensorRT device buffer seen through the CUDA array interface (torch.as_tensor takes it)."""

    def __init__(self, pointer: int, shape: tuple[int, ...], code: str):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": _TYPESTR[code], "data": (int(pointer), False),
                                         "version": 3, "strides": None}


def _attention(q, k, v, bias, valid, need_mass: int):
    """The engine's attention dispatch: the fused kernel on CUDA (where OpenAI Triton is), else the reference."""
    if q.is_cuda:
        import torch

        from ..cache.key_sets import _attention_with_mass

        out, mass = _attention_with_mass(q, k, v, bias, valid, bool(need_mass))
        if mass is None:
            mass = torch.zeros(k.shape[:3], dtype=torch.float32, device=k.device)
        return out, mass
    return ops.attention_impl(q, k, v, bias, valid, need_mass)


def run_op(op_type: str, inputs: list, attrs: dict[str, Any]) -> tuple:
    """One op on torch tensors (the enqueue body; also what tests call on CPU tensors)."""
    a = attrs
    if op_type == "StacAttention":
        return _attention(*inputs, a["need_mass"])
    if op_type == "StacScoreDecay":
        return (ops.score_decay_impl(*inputs, a["gamma"]),)
    if op_type == "StacTopKKeep":
        return ops.topk_keep_impl(*inputs, a["window"], a["hh"], a["pinned_frames"], a["patch_size"],
                                  a["patch_start_idx"], a["conf_threshold"], a["track_positions"])
    if op_type == "StacVoxelPoolUpdate":
        return ops.pool_update_impl(inputs[:_NP], *inputs[_NP:], a["voxel_size"], a["merge_cos"], a["score_gate"])
    if op_type == "StacRetrieve":
        return ops.retrieve_impl(inputs[:_NP], *inputs[_NP:], a["window"], a["retrieval"], a["retrieval_start_frame"],
                                 a["refresh_steps"], a["radius"], a["include_buffer"], a["voxel_size"])
    raise KeyError(op_type)


def _enqueue(op_type: str, attrs: dict, input_desc, output_desc, inputs, outputs, stream: int) -> None:
    import torch

    _, in_specs, out_specs, _ = SPECS[op_type]
    with torch.cuda.stream(torch.cuda.ExternalStream(int(stream))):
        tensors = [torch.as_tensor(_DeviceArray(p, tuple(d.dims), code), device="cuda")
                   for p, d, (_, code) in zip(inputs, input_desc, in_specs)]
        results = run_op(op_type, tensors, attrs)
        for p, d, (_, code), value in zip(outputs, output_desc, out_specs, results):
            target = torch.as_tensor(_DeviceArray(p, tuple(d.dims), code), device="cuda")
            target.copy_(value.reshape(target.shape))


# ----------------------------------------------------------------------------- classes
_lock = threading.Lock()
_registered: dict[int, list] = {}  # id(trt module) -> creators (kept alive: the registry holds raw pointers)


def _classes(trt: ModuleType):
    """The plugin and creator classes for one TensorRT module (their bases come from it)."""

    def fields_to_collection(op_type: str, values: dict, keep: list) -> Any:
        """Plugin fields of the attributes; ``keep`` receives the arrays, which must outlive the
        collection (a PluginField points into its array without holding it)."""
        out = []
        for name, kind, _ in SPECS[op_type][3]:
            if kind == "FLOAT":
                data, kind_ = np.array([values[name]], np.float32), trt.PluginFieldType.FLOAT32
            else:
                data = np.array(values[name] if kind == "INTS" else [values[name]], np.int32)
                kind_ = trt.PluginFieldType.INT32
            keep.append(data)
            out.append(trt.PluginField(name, data, kind_))
        return trt.PluginFieldCollection(out)

    class StacPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, op_type: str, node: str, attrs: dict, phase=None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.op_type, self.node, self.attrs, self.phase = op_type, node, dict(attrs), phase
            self.plugin_name, self.plugin_namespace, self.plugin_version = op_type, PLUGIN_NAMESPACE, PLUGIN_VERSION
            self.num_outputs = len(SPECS[op_type][2])
            self.timing_cache_id = ""

        # ---------------------------------------------------------------- core
        def get_capability_interface(self, capability):
            return self

        def clone(self):
            return StacPlugin(self.op_type, self.node, self.attrs, self.phase)

        # ---------------------------------------------------------------- build
        def get_output_data_types(self, input_types):
            return [_dtype(trt, code) for _, code in SPECS[self.op_type][2]]

        def get_output_shapes(self, inputs, shape_inputs, builder):
            try:
                known = [[d.get_constant_value() if d.is_constant() else None for d in dims] for dims in inputs]
                check_input_dims(self.op_type, known, self.node)
                exprs = [[dims[i] for i in range(len(dims))] for dims in inputs]
                shapes = output_dims(self.op_type, exprs,
                                     lambda a, b: builder.operation(trt.DimensionOperation.SUB, a, b))
            except Exception as error:  # the bindings only log it: keep the message for the build report
                ERRORS.append(str(error))
                raise
            result = []
            for shape in shapes:
                dims = trt.DimsExprs(len(shape))
                for i, d in enumerate(shape):
                    dims[i] = builder.constant(d) if isinstance(d, int) else d
                result.append(dims)
            return result

        def supports_format_combination(self, pos, in_out, num_inputs):
            _, in_specs, out_specs, _ = SPECS[self.op_type]
            code = (in_specs + out_specs)[pos][1]
            desc = in_out[pos].desc
            return desc.format == trt.TensorFormat.LINEAR and desc.type == _dtype(trt, code)

        def configure_plugin(self, inputs, outputs):
            known = [[int(d) if d >= 0 else None for d in t.desc.dims] for t in inputs]
            try:
                check_input_dims(self.op_type, known, self.node)
            except PluginConfigError as error:
                ERRORS.append(str(error))
                raise

        def get_valid_tactics(self):
            return []

        def get_workspace_size(self, inputs, outputs):
            return 0

        # ---------------------------------------------------------------- runtime
        def get_fields_to_serialize(self):
            self._serialized = []  # kept on the plugin: TensorRT reads the fields after this returns
            return fields_to_collection(self.op_type, self.attrs, self._serialized)

        def on_shape_change(self, inputs, outputs):
            pass

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            _enqueue(self.op_type, self.attrs, input_desc, output_desc, inputs, outputs, stream)

    class StacPluginCreator(trt.IPluginCreatorV3One):
        def __init__(self, op_type: str):
            trt.IPluginCreatorV3One.__init__(self)
            self.op_type = op_type
            self.name, self.plugin_namespace, self.plugin_version = op_type, PLUGIN_NAMESPACE, PLUGIN_VERSION
            types = {"INT": trt.PluginFieldType.INT32, "INTS": trt.PluginFieldType.INT32,
                     "FLOAT": trt.PluginFieldType.FLOAT32}
            self._empty = np.array([], np.int32)  # outlives the declared fields that point into it
            self.field_names = trt.PluginFieldCollection(
                [trt.PluginField(name, self._empty, types[kind]) for name, kind, _ in SPECS[op_type][3]])

        def create_plugin(self, name, field_collection, phase):
            try:
                fields = {f.name: np.array(f.data) for f in field_collection}
                return StacPlugin(self.op_type, name, parse_fields(self.op_type, name, fields), phase)
            except Exception as error:
                ERRORS.append(str(error))
                raise

    return StacPlugin, StacPluginCreator


def register(trt: Optional[ModuleType] = None) -> list:
    """Register the five plugin creators with TensorRT's plugin registry (once per process and
    TensorRT module); returns the creators."""
    trt = trt or load()
    with _lock:
        if id(trt) not in _registered:
            _, creator_class = _classes(trt)
            registry = trt.get_plugin_registry()
            creators = []
            for op_type in SPECS:
                creator = creator_class(op_type)
                if not registry.register_creator(creator, PLUGIN_NAMESPACE):
                    raise RuntimeError(f"TensorRT refused to register the {PLUGIN_IDS[op_type]} plugin creator "
                                       "(another creator of that name and namespace is registered?)")
                creators.append(creator)
            _registered[id(trt)] = creators
        return _registered[id(trt)]


def needs_python(op_types) -> bool:
    return any(IMPLEMENTATIONS[op][1] for op in op_types)
