"""Export one streaming step to ONNX.

    from stac_backend.export.onnx_export import export_step
    export_step(model, CacheConfig(policy="stac"), "stac_step.onnx", height=392, width=518)

The graph's inputs are ``images`` float32 [B, C, 3, H, W] (in [0, 1]), ``frame_offset`` int64 [B]
and the state ``in_<name>`` (``StepLayout.state()``); its outputs the seven per-frame outputs
[B, C, ...] and the new state ``out_<name>``. Dynamic axes: batch B (streams), chunk C (1 ..
``cache.chunk``) and every budget axis of the state (so one graph serves any budget of the
policy); H and W are fixed at export. The cache work is done by ``stac``-domain nodes
(``onnx_ops``). ``StepLayout`` JSON is stored in the model's metadata (``stac.layout``).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Optional, Union

import onnx
import torch

from ..cache import CacheConfig
from ..model.vggt import VGGT
from ..graph.layout import LAYOUT_METADATA_KEY, StepLayout
from ..graph.io import input_names, output_names, read_layout  # noqa: F401 - part of this module's API
from ..graph.onnx_ops import translation_table
from .onnx_rewrites import slices_for_split_sequences
from .step import FunctionalStep, traceable

log = logging.getLogger("stac.export")
OPSET = 18
# Small, distinct sizes for the dynamic budget axes of the example state (the graph is generic in them).
_EXAMPLE_BUDGET = {"kv_tokens": 7, "hot_tokens": 11, "ret_tokens": 5, "voxels": 6, "cam_frames": 3}


def _example(layout: StepLayout, batch: int, chunk: int):
    """Example inputs (small budgets) and the dynamic-shape spec for torch.export."""
    Dim = torch.export.Dim
    dims = {"batch": Dim("batch", min=1, max=1024)}
    if layout.max_chunk > 1:
        dims["chunk"] = Dim("chunk", min=1, max=layout.max_chunk)
    for name in _EXAMPLE_BUDGET:
        dims[name] = Dim(name, min=1, max=1 << 24)
    images = torch.rand(batch, chunk, 3, layout.height, layout.width)
    offset = torch.zeros(batch, dtype=torch.int64)
    specs = [{0: dims["batch"], 1: dims["chunk"]} if "chunk" in dims else {0: dims["batch"]}, {0: dims["batch"]}]
    state = []
    for s in layout.state():
        shape = tuple(_EXAMPLE_BUDGET[d] if d else n for n, d in zip(s.shape, s.dims))
        state.append(torch.full((batch,) + shape, s.fill, dtype=s.dtype))
        spec = {0: dims["batch"]}
        spec.update({i + 1: dims[d] for i, d in enumerate(s.dims) if d})
        specs.append(spec)
    # forward(images, frame_offset, *state): the varargs take one nested spec tuple
    return (images, offset, *state), (specs[0], specs[1], tuple(specs[2:]))


def export_step(
    model: VGGT,
    cache: Union[CacheConfig, str],
    path: Union[str, Path],
    *,
    height: int,
    width: int,
    max_frames: Optional[int] = None,
    external_data: Optional[bool] = None,
    optimize: bool = True,
    standard_attention: bool = False,
) -> Path:
    """Write the step graph for ``model`` under ``cache`` to ``path`` (and ``path.data`` with
    external data: default when the weights exceed 1 GiB). Returns the path.

    standard_attention (``full`` only): attention with standard ONNX ops, so the graph has no
    custom nodes at all (Triton's onnxruntime / tensorrt backends, model_repository_onnx/)."""
    if isinstance(cache, str):
        cache = CacheConfig(policy=cache)
    layout = StepLayout(model.config, cache, height, width, max_frames)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    param = next(model.parameters())
    if param.dtype != torch.float32:
        raise ValueError(f"export a float32 model (got {param.dtype}); the state and the custom ops are float32")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if external_data is None:
        external_data = weights > (1 << 30)
    step = FunctionalStep(model.eval(), layout, standard_attention).eval()
    chunk = min(2, layout.max_chunk)
    args, dynamic_shapes = _example(layout, batch=2, chunk=chunk)
    started = time.perf_counter()
    with traceable(model, height, width), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            step, args, dynamo=True, opset_version=OPSET, input_names=input_names(layout),
            output_names=output_names(layout), dynamic_shapes=dynamic_shapes,
            custom_translation_table=translation_table(), optimize=optimize, verbose=False,
        )
    proto = program.model_proto
    slices_for_split_sequences(proto.graph)  # TensorRT takes no ONNX sequences
    _annotate(proto, layout)
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    if external_data:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))
    log.info("exported %s step (%s) to %s in %.1f s", layout.policy, f"{height}x{width}", path, time.perf_counter() - started)
    return path


def _annotate(proto: onnx.ModelProto, layout: StepLayout) -> None:
    """Metadata (layout JSON) and readable names for the symbolic axes."""
    entry = proto.metadata_props.add()
    entry.key, entry.value = LAYOUT_METADATA_KEY, layout.to_json()
    proto.producer_name = "stac_backend.export"
    proto.doc_string = (f"One streaming step of a VGGT-family model with the {layout.policy!r} cache policy; "
                        "state in via in_*, out via out_*; stac-domain nodes are TensorRT plugins (namespace stac).")
