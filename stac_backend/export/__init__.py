"""Export of one streaming step to ONNX (STAC cache ops as ``stac`` custom nodes) and the runtimes
that execute the exported graph (ONNX Runtime here; TensorRT where it is installed).

- ``layout.StepLayout``: the explicit fixed-budget state of a stream, per policy.
- ``ops``: the ``stac::`` custom ops (torch) and their shared eager implementations.
- ``step.FunctionalStep``: the step as a pure function of that state (what is exported).
- ``onnx_export.export_step``: torch -> ONNX (opset 18, dynamic chunk size, external data).
- ``ort_runtime.OnnxRuntimeStream``: a stream that runs the exported graph with ONNX Runtime.
"""

from ..graph.layout import StepLayout

__all__ = ["StepLayout"]
