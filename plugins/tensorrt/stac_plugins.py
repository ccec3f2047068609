"""The ``stac`` ops as TensorRT quickly-deployable plugins: import and call ``register()`` before
parsing an exported graph or deserializing an engine built from one.

    import stac_plugins; stac_plugins.register()
    # then trt.OnnxParser(...).parse_from_file("stac_step.onnx") resolves the stac nodes

Definitions (shape descriptions, JIT implementations on torch CUDA tensors calling the engine's
own cache code, and AOT Triton kernels for StacAttention and StacScoreDecay - the other three ops
are JIT-only; docs/export.md) live in ``stac_backend/export/trt_plugins.py`` so that the engine's TensorRT
runtime and the NGC image (which installs ``stac_backend``) share them. NOT EXERCISED HERE:
TensorRT cannot be installed on the project's machines (docs/export.md).
"""

from stac_backend.export.trt_plugins import PLUGIN_IDS, register

__all__ = ["PLUGIN_IDS", "register"]
