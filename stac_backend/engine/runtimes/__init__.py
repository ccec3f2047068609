"""Runtimes that execute an exported step graph, behind the runtime interface (``engine.runtime``):
one shared stream adapter (``exported``) and one executor per engine - ONNX Runtime
(``onnx_runtime``) and TensorRT (``tensorrt_runtime``). Imported lazily by ``make_runtime``."""
