"""Graph export and engine building (the ``stac export`` command, ``command.py``).

- ``onnx_export.export_step``: one streaming step -> ONNX (opset 18, dynamic batch and chunk,
  external data), the STAC cache operations as ``stac`` nodes; ``step.FunctionalStep`` is the
  module that is traced, ``onnx_rewrites`` keeps the graph parsable by TensorRT.
- ``trt_build.build_engine``: a TensorRT engine of an exported graph (``tensorrt`` or
  ``tensorrt_rtx``), with the stac plugins; ``trt_aot`` / ``trt_aot_plugins``: compiled kernels for
  datacenter TensorRT's ``tensorrt.plugin``; ``trt_repository``: the deployment build.
- ``triton_variant``: model configs for Triton's own onnxruntime / tensorrt backends.

What export shares with the runtimes (state layout, custom ops, plugins) is in ``stac_backend.graph``;
the runtimes that execute an exported graph are in ``stac_backend.engine.runtimes``.
"""

from ..graph.layout import StepLayout

__all__ = ["StepLayout"]
