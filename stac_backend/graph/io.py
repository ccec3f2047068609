"""The exported step graph's interface, read from its layout: I/O tensor names in graph order, and
the layout recorded in an ONNX file's metadata (what every runtime and the engine build read)."""

from __future__ import annotations


from .layout import LAYOUT_METADATA_KEY, OUTPUTS, StepLayout


def input_names(layout: StepLayout) -> list[str]:
    return ["images", "frame_offset"] + ["in_" + n for n in layout.state_names()]


def output_names(layout: StepLayout) -> list[str]:
    return list(OUTPUTS) + ["out_" + n for n in layout.state_names()]


def read_layout(model) -> StepLayout:
    """The StepLayout recorded in an exported graph (a path or an onnx.ModelProto; loads no weights)."""
    import onnx

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == LAYOUT_METADATA_KEY:
            return StepLayout.from_json(entry.value)
    raise ValueError(f"{model if not isinstance(model, onnx.ModelProto) else 'model'} has no {LAYOUT_METADATA_KEY} "
                     "metadata: not a stac step graph")



