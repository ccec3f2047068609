"""What graph export and the runtimes that execute an exported graph share: the fixed-budget state
layout of one streaming step, the STAC cache operations as custom ops, and their forms for ONNX
(schemas), ONNX Runtime (Python custom ops) and TensorRT (IPluginV3 plugins).

- ``layout.StepLayout``: the explicit state of a stream, per policy, and the graph's I/O names.
- ``ops``: the ``stac::`` torch custom ops and their eager implementations (the engine's own code).
- ``op_specs.SPECS``: every op's inputs, outputs and attributes (one table for all forms).
- ``onnx_ops``: ONNX schemas and the exporter's translation; ``ort_ops``: ONNX Runtime ops.
- ``tensorrt``: the TensorRT import shim (``tensorrt`` or ``tensorrt_rtx``); ``trt_plugins``: the plugins.
"""

from .layout import StepLayout

__all__ = ["StepLayout"]
