"""Build a TensorRT engine from an exported step graph (stac nodes -> the plugins of ``trt_plugins``).

NOT EXERCISED HERE: TensorRT is not installable on the project's machines. This runs where it is -
the NGC Triton container of docker-compose's ``prepare`` step (``plugins/tensorrt/build_engine.py``
is the command line, ``plugins/tensorrt/build_repository_engines.sh`` the deployment hook).

    build_engine("stac_step.onnx", "stac_step.plan", max_batch=4)

The optimisation profile comes from the graph's ``StepLayout``: batch 1..max_batch (opt
``opt_batch``), chunk 1..cache.chunk (opt: the chunk), every state budget axis fixed at the
layout's value (the engine serves exactly that budget). The layout is written beside the plan as
``<plan>.layout.json`` for the runtime.

Plugin implementations (``plugins``): ``"aot"`` (default) marks the graph's nodes of the ops that
have a compiled kernel (``trt_aot.AOT_OPS``) with ``aot=1`` in a copy of the graph beside the
original (``<name>.aot.onnx``, sharing its external data), so TensorRT bakes their PTX into the
engine; the other ops stay JIT. ``"jit"`` parses the graph as exported: every stac op is a Python
callback (the fallback if an AOT kernel misbehaves). The plan's meta records which ops run where.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional, Union

from .layout import StepLayout
from .onnx_export import read_layout
from .ops import PLUGIN_NAMESPACE
from .trt_aot import AOT_OPS

log = logging.getLogger("stac.export.trt")


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


def build_engine(
    onnx_path: Union[str, Path],
    plan_path: Union[str, Path],
    *,
    max_batch: int = 1,
    opt_batch: int = 1,
    fp16: bool = False,
    workspace_gib: float = 8.0,
    layout: Optional[StepLayout] = None,
    plugins: str = "aot",
) -> Path:
    if plugins not in ("aot", "jit"):
        raise ValueError(f"plugins must be 'aot' or 'jit', got {plugins!r}")
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from .trt_plugins import register

    register()  # before parsing: the parser resolves stac nodes to registered plugins
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    layout = layout or read_layout(onnx_path)
    source_path = onnx_path
    if plugins == "aot":
        if not hasattr(trtp, "aot_impl"):
            raise RuntimeError(f"TensorRT {trt.__version__} has no tensorrt.plugin.aot_impl (needs >= 10.10); "
                               "build with plugins='jit'")
        onnx_path = mark_aot_nodes(onnx_path)
    ops = plugin_ops(onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    started = time.perf_counter()
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)  # standard layers only; the plugins and the state stay fp32
    profile = builder.create_optimization_profile()
    shapes = profile_shapes(layout, max_batch, opt_batch)
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in shapes:
            raise RuntimeError(f"engine input {name!r} is not in the layout of {onnx_path}")
        profile.set_shape(name, *shapes[name])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    meta = {"layout": json.loads(layout.to_json()), "max_batch": max_batch, "opt_batch": opt_batch, "fp16": fp16,
            "tensorrt": trt.__version__, "onnx": source_path.name, "plugins": plugins, **ops,
            "needs_python": bool(ops["jit_ops"])}
    layout_path(plan_path).write_text(json.dumps(meta, indent=2, sort_keys=True))
    log.info("built %s in %.0f s (%d bytes); AOT kernels: %s; JIT (needs Python): %s", plan_path,
             time.perf_counter() - started, plan_path.stat().st_size, ops["aot_ops"] or "none", ops["jit_ops"] or "none")
    return plan_path


def mark_aot_nodes(onnx_path: Union[str, Path], ops=AOT_OPS) -> Path:
    """Copy of the graph (beside it, same external data) whose ``ops`` nodes carry ``aot=1``: the
    ONNX parser then takes the plugin's AOT implementation for them. The original is unchanged."""
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
    """Which stac ops of a graph run as AOT kernels (``aot=1``) and which as JIT Python callbacks."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    aot, jit = set(), set()
    for node in model.graph.node:
        if node.domain != PLUGIN_NAMESPACE:
            continue
        flag = next((a.i for a in node.attribute if a.name == "aot"), 0)
        (aot if flag else jit).add(node.op_type)
    return {"aot_ops": sorted(aot), "jit_ops": sorted(jit)}


def layout_path(plan_path: Union[str, Path]) -> Path:
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name + ".layout.json")


def read_plan_layout(plan_path: Union[str, Path]) -> tuple[StepLayout, dict]:
    meta = json.loads(layout_path(plan_path).read_text())
    return StepLayout.from_json(json.dumps(meta["layout"])), meta
