"""Rewrites of the exported graph that keep its meaning and make every TensorRT parser take it.

``torch.split`` with a fixed chunk size is traced to ``SplitToSequence`` + ``SequenceAt`` (the
onnxscript optimizer folds it, an unoptimized export keeps it); TensorRT has no sequence type and
refuses both. Each ``SequenceAt(SplitToSequence(x, split=s, axis=a), i)`` with constant ``s`` and
``i >= 0`` becomes ``Slice(x, [i*s], [(i+1)*s], [a])`` - the same tensor, Slice clamps the last chunk.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def slices_for_split_sequences(graph: onnx.GraphProto) -> int:
    """Rewrite in place; returns how many SplitToSequence nodes were replaced."""
    constants = _constants(graph)
    graph_outputs = {o.name for o in graph.output}
    replaced = 0
    for node in list(graph.node):
        if node.op_type != "SplitToSequence" or len(node.input) < 2 or node.output[0] in graph_outputs:
            continue
        split = constants.get(node.input[1])
        users = [u for u in graph.node if node.output[0] in u.input]
        if split is None or split.ndim != 0 or not users or any(u.op_type != "SequenceAt" for u in users):
            continue
        indices = [constants.get(u.input[1]) for u in users]
        if any(i is None or i.ndim != 0 or int(i) < 0 for i in indices):
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        size = int(split)
        new_nodes = []
        for user, index in zip(users, indices):
            i, base = int(index), f"{node.name or node.output[0]}_slice{int(index)}"
            bounds = {"starts": i * size, "ends": (i + 1) * size, "axes": axis}
            for key, value in bounds.items():
                new_nodes.append(helper.make_node("Constant", [], [f"{base}_{key}"],
                                                  value=numpy_helper.from_array(np.array([value], np.int64))))
            new_nodes.append(helper.make_node("Slice", [node.input[0]] + [f"{base}_{k}" for k in bounds],
                                              [user.output[0]], name=base))
        position = list(graph.node).index(node)
        for stale in [node] + users:
            graph.node.remove(stale)
        for offset, new in enumerate(new_nodes):
            graph.node.insert(position + offset, new)
        replaced += 1
    return replaced
