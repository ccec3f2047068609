"""Build a TensorRT engine from an exported step graph, with either TensorRT package.

    build_engine("stac_step.onnx", "stac_step.plan", max_batch=4)     # stac export tensorrt ONNX PLAN

1. The graph's inputs are checked against its ``StepLayout`` (names, dtypes, every fixed
   dimension): a wrongly shaped state input is refused before TensorRT sees it.
2. The stac plugins are registered (``graph.trt_plugins``) and the ONNX parser of whichever
   package ``graph.tensorrt.load`` gives parses the graph; every ``stac`` node must become a plugin
   layer of its op (checked), and the plugins' own checks (attributes, shapes) are reported with
   the parser's errors.
3. One optimisation profile: batch 1..max_batch (opt ``opt_batch``), chunk 1..cache.chunk (opt: the
   chunk), every state budget fixed at the layout's value (the engine serves exactly that budget).
4. The plan is written with ``<plan>.layout.json``: the layout, the profile, the engine's I/O
   (name, dtype, shape with -1 for dynamic axes, in the network's order), the plugin layers per op
   and their attributes, which package and version built it, and whether it needs Python.

``plugins``: ``"python"`` (default, both packages): every stac op is an IPluginV3 Python plugin.
``"aot"`` (datacenter ``tensorrt`` >= 10.10 only, ``trt_aot_plugins``): StacAttention and
StacScoreDecay become ahead-of-time OpenAI-Triton kernels baked into the engine (no Python for
them at run time); the other ops stay Python plugins.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional, Union

from ..graph.io import input_names, output_names, read_layout
from ..graph.layout import StepLayout, dtype_name
from ..graph.ops import PLUGIN_NAMESPACE
from .trt_aot import AOT_OPS

log = logging.getLogger("stac.export.trt")

PLUGIN_MODES = ("python", "aot")


class EngineBuildError(RuntimeError):
    """TensorRT refused the graph or failed to build it; the message says why."""


def profile_shapes(layout: StepLayout, max_batch: int, opt_batch: int = 1) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shape per engine input."""
    c = layout.max_chunk
    img = (3, layout.height, layout.width)
    shapes = {
        "images": ((1, 1) + img, (opt_batch, c) + img, (max_batch, c) + img),
        "frame_offset": ((1,), (opt_batch,), (max_batch,)),
    }
    for s in layout.state():
        shapes["in_" + s.name] = ((1,) + s.shape, (opt_batch,) + s.shape, (max_batch,) + s.shape)
    return shapes


_ONNX_DTYPES = {1: "float32", 6: "int32", 7: "int64", 9: "bool"}


def check_graph_inputs(proto, layout: StepLayout) -> None:
    """Refuse a graph whose inputs are not the layout's: names in order, dtypes, and every
    dimension fixed in the graph must equal the layout's (batch, chunk and budget axes may be symbolic)."""
    expected = {"images": ("float32", (None, None, 3, layout.height, layout.width)), "frame_offset": ("int64", (None,))}
    for s in layout.state():
        expected["in_" + s.name] = (dtype_name(s.dtype), (None,) + s.shape)
    names = [i.name for i in proto.graph.input]
    if names != list(expected):
        raise EngineBuildError(f"graph inputs {names} are not the layout's {list(expected)}")
    problems = []
    for value in proto.graph.input:
        dtype, shape = expected[value.name]
        t = value.type.tensor_type
        got_dtype = _ONNX_DTYPES.get(t.elem_type, f"onnx type {t.elem_type}")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if got_dtype != dtype:
            problems.append(f"{value.name}: dtype {got_dtype}, layout says {dtype}")
        if len(dims) != len(shape):
            problems.append(f"{value.name}: rank {len(dims)} {dims}, layout says {len(shape)} [B, {', '.join(map(str, shape[1:]))}]")
            continue
        for axis, (got, want) in enumerate(zip(dims, shape)):
            if got is not None and want is not None and got != want:
                problems.append(f"{value.name}: dimension {axis} is {got}, layout says {want}")
    if problems:
        raise EngineBuildError("the graph's inputs do not match its state layout (" + layout.policy + "): "
                               + "; ".join(problems))


def check_stac_nodes(proto, plugins: str = "python") -> None:
    """Refuse ``stac`` nodes with attributes their plugin does not take. TensorRT's ONNX parser
    hands a plugin only the fields its creator declares and silently drops any other attribute,
    so an unknown one (a typo, a graph from a newer exporter) would otherwise be ignored."""
    from ..graph.op_specs import SPECS

    allowed_extra = {"plugin_namespace", "plugin_version"} | ({"aot"} if plugins == "aot" else set())
    problems = []
    for node in proto.graph.node:
        if node.domain != PLUGIN_NAMESPACE:
            continue
        if node.op_type not in SPECS:
            problems.append(f"node {node.name!r}: no stac plugin named {node.op_type!r} (known: {sorted(SPECS)})")
            continue
        known = {name for name, _, _ in SPECS[node.op_type][3]}
        unknown = sorted({a.name for a in node.attribute} - known - allowed_extra)
        if unknown:
            hint = " ('aot' is read only with plugins='aot', datacenter tensorrt)" if "aot" in unknown else ""
            problems.append(f"{node.op_type} node {node.name!r}: unknown attribute(s) {unknown}; "
                            f"{node.op_type} takes {sorted(known)}{hint}")
    if problems:
        raise EngineBuildError("the graph has stac nodes TensorRT cannot build: " + "; ".join(problems))


class _Logger:
    """A TensorRT logger that keeps the errors (for the exception) and forwards the rest to logging."""

    def __new__(cls, trt):
        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity, msg):
                if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                    self.errors.append(msg)
                    log.error("%s", msg)
                elif severity == trt.ILogger.WARNING:
                    log.warning("%s", msg)
                else:
                    log.debug("%s", msg)

        return Logger()


def parse_network(onnx_path: Union[str, Path], trt, plugins: str = "python"):
    """(builder, network, parser, logger) with the graph parsed and the plugins registered; raises
    EngineBuildError with TensorRT's and the plugins' messages when it cannot be parsed."""
    from ..graph import trt_plugins

    trt_plugins.register(trt)
    if plugins == "aot":
        from .trt_aot_plugins import register_aot

        register_aot(trt)
    logger = _Logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    del trt_plugins.ERRORS[:]
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] + list(trt_plugins.ERRORS)
        raise EngineBuildError(f"TensorRT ({trt.__name__} {trt.__version__}) could not parse {onnx_path}:\n"
                               + "\n".join(dict.fromkeys(errors)))
    return builder, network, parser, logger


def plugin_layers(network, trt) -> list[dict[str, Any]]:
    """Every plugin layer of a parsed network: op type, node name, and its attributes."""
    out = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type != trt.LayerType.PLUGIN_V3:
            continue
        layer.__class__ = trt.IPluginV3Layer  # the bindings hand out the ILayer base; this is how to downcast
        plugin = layer.plugin
        entry = {"layer": layer.name, "op": getattr(plugin, "op_type", None) or plugin.plugin_name,
                 "namespace": getattr(plugin, "plugin_namespace", None),
                 "attributes": dict(getattr(plugin, "attrs", {})),
                 "inputs": layer.num_inputs, "outputs": layer.num_outputs}
        out.append(entry)
    return out


def network_io(network, trt) -> list[dict[str, Any]]:
    """The network's inputs then outputs: name, mode, dtype name, shape (-1 = dynamic)."""
    names = {trt.float32: "float32", trt.int32: "int32", trt.int64: "int64", trt.bool: "bool", trt.float16: "float16"}
    io = []
    for mode, count, get in (("input", network.num_inputs, network.get_input),
                             ("output", network.num_outputs, network.get_output)):
        for i in range(count):
            t = get(i)
            io.append({"name": t.name, "mode": mode, "dtype": names.get(t.dtype, str(t.dtype)), "shape": list(t.shape)})
    return io


def build_engine(
    onnx_path: Union[str, Path],
    plan_path: Union[str, Path],
    *,
    max_batch: int = 1,
    opt_batch: int = 1,
    fp16: bool = False,
    workspace_gib: float = 8.0,
    layout: Optional[StepLayout] = None,
    plugins: str = "python",
) -> Path:
    import onnx

    from ..graph.tensorrt import load
    from ..graph.trt_plugins import IMPLEMENTATIONS

    if plugins not in PLUGIN_MODES:
        raise ValueError(f"plugins must be one of {PLUGIN_MODES}, got {plugins!r}")
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= opt_batch <= max_batch, got {opt_batch} and {max_batch}")
    trt = load()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    source = onnx.load(str(onnx_path), load_external_data=False)
    layout = layout or read_layout(source)
    check_graph_inputs(source, layout)
    check_stac_nodes(source, plugins)
    stac_nodes = [n for n in source.graph.node if n.domain == PLUGIN_NAMESPACE]
    parsed_path = onnx_path
    if plugins == "aot":
        parsed_path = mark_aot_nodes(onnx_path)
    started = time.perf_counter()
    builder, network, _parser, logger = parse_network(parsed_path, trt, plugins)
    layers = plugin_layers(network, trt)
    aot_ops = sorted({n.op_type for n in stac_nodes if plugins == "aot" and n.op_type in AOT_OPS})
    python_nodes = [n for n in stac_nodes if n.op_type not in aot_ops]
    if len(layers) != len(python_nodes) or sorted(e["op"] for e in layers) != sorted(n.op_type for n in python_nodes):
        raise EngineBuildError(f"{len(stac_nodes)} stac nodes in {onnx_path.name} but TensorRT made "
                               f"{len(layers)} stac plugin layers: {[e['op'] for e in layers]}")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if names != input_names(layout):
        raise EngineBuildError(f"network inputs {names} are not the layout's {input_names(layout)}")
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    if outputs != output_names(layout):
        raise EngineBuildError(f"network outputs {outputs} are not the layout's {output_names(layout)}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise ValueError(f"{trt.__name__} has no FP16 builder flag (TensorRT-RTX picks precisions from the graph)")
        config.set_flag(trt.BuilderFlag.FP16)  # standard layers only; the plugins and the state stay fp32
    profile = builder.create_optimization_profile()
    shapes = profile_shapes(layout, max_batch, opt_batch)
    for name in names:
        profile.set_shape(name, *shapes[name])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path}:\n" + "\n".join(logger.errors))
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    python_ops = sorted({e["op"] for e in layers})
    meta = {
        "layout": json.loads(layout.to_json()), "max_batch": max_batch, "opt_batch": opt_batch, "fp16": fp16,
        "tensorrt": f"{trt.__name__} {trt.__version__}", "onnx": onnx_path.name, "plugins": plugins,
        "profile": {name: [list(s) for s in profile.get_shape(name)] for name in names},  # as TensorRT holds it
        "io": network_io(network, trt),
        "plugin_layers": {op: sum(e["op"] == op for e in layers) for op in python_ops},
        "plugin_attributes": {op: next(e["attributes"] for e in layers if e["op"] == op) for op in python_ops},
        "aot_ops": aot_ops, "python_ops": python_ops,
        "implementations": {op: IMPLEMENTATIONS[op][0] for op in python_ops},
        "needs_python": any(IMPLEMENTATIONS[op][1] for op in python_ops),
        "plan_bytes": plan_path.stat().st_size,
    }
    plan_meta_path(plan_path).write_text(json.dumps(meta, indent=2, sort_keys=True))
    log.info("built %s with %s %s in %.1f s (%d bytes); plugin layers %s; needs Python: %s", plan_path, trt.__name__,
             trt.__version__, time.perf_counter() - started, meta["plan_bytes"], meta["plugin_layers"],
             meta["needs_python"])
    return plan_path


def mark_aot_nodes(onnx_path: Union[str, Path], ops=AOT_OPS) -> Path:
    """Copy of the graph (beside it, same external data) whose ``ops`` nodes carry ``aot=1``: the
    datacenter ONNX parser then takes the tensorrt.plugin AOT implementation. The original is unchanged."""
    import onnx
    from onnx import helper

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)  # weights stay in the shared .data file
    for node in model.graph.node:
        if node.domain == PLUGIN_NAMESPACE and node.op_type in ops:
            kept = [a for a in node.attribute if a.name != "aot"]
            del node.attribute[:]
            node.attribute.extend(kept + [helper.make_attribute("aot", 1)])
    out = onnx_path.with_name(onnx_path.stem + ".aot.onnx")
    onnx.save(model, str(out))
    return out


def plugin_ops(onnx_path: Union[str, Path]) -> dict[str, list[str]]:
    """Which stac ops of a graph are marked for AOT kernels (``aot=1``) and which stay Python plugins."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    aot, python = set(), set()
    for node in model.graph.node:
        if node.domain == PLUGIN_NAMESPACE:
            flag = next((a.i for a in node.attribute if a.name == "aot"), 0)
            (aot if flag else python).add(node.op_type)
    return {"aot_ops": sorted(aot), "python_ops": sorted(python)}


def plan_meta_path(plan_path: Union[str, Path]) -> Path:
    from ..engine.runtimes.tensorrt_runtime import plan_meta_path as path

    return path(plan_path)


def read_plan_meta(plan_path: Union[str, Path]) -> tuple[StepLayout, dict]:
    from ..engine.runtimes.tensorrt_runtime import read_plan_meta as read

    return read(plan_path)
