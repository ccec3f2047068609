"""The ``stac`` custom ops for ONNX Runtime (CPU): register them and open a session on an exported step.

    import onnxruntime as ort
    from stac_ops import session_for
    session = session_for("stac_step.onnx")            # ops registered, graph prepared for ONNX Runtime

The ops are onnxruntime-extensions Python ops (``@onnx_op``) implemented by
``stac_backend.export.ort_ops`` on top of the very functions the torch engine runs
(``stac_backend.export.ops``). They need Python in the process: they serve
``stac_backend.export.ort_runtime`` (the engine's ONNX Runtime runtime, also behind Triton's
Python backend with RUNTIME=onnxruntime), not Triton's C++ onnxruntime backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from stac_backend.export.ort_ops import ORT_DOMAIN, prepare_model, register, rewrite_for_ort, session_options

__all__ = ["ORT_DOMAIN", "prepare_model", "register", "rewrite_for_ort", "session_options", "session_for"]


def session_for(path: Union[str, Path], threads: int = 0):
    """An InferenceSession (CPU) over an exported step graph, stac ops registered."""
    import onnxruntime as ort

    return ort.InferenceSession(prepare_model(path), session_options(threads), providers=["CPUExecutionProvider"])


if __name__ == "__main__":  # smoke check: python plugins/onnxruntime/stac_ops.py GRAPH.onnx
    import sys

    session = session_for(sys.argv[1])
    print([i.name for i in session.get_inputs()][:4], "...", len(session.get_outputs()), "outputs")
