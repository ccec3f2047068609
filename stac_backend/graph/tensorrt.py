"""TensorRT, from whichever package provides it: NVIDIA's datacenter ``tensorrt`` (the NGC
containers) or ``tensorrt_rtx`` (TensorRT for RTX, pip-installable, builds engines without a GPU).

Both expose the same Python API for what this project uses: Builder, network definition,
OnnxParser, optimisation profiles, the plugin registry and the IPluginV3 plugin interfaces. The
rest of the code imports TensorRT only through ``load()``:

    from stac_backend.graph.tensorrt import load
    trt = load()            # the module; ImportError naming both packages when neither is installed

``STAC_TENSORRT=tensorrt`` or ``=tensorrt_rtx`` picks one when both are installed (default: the
datacenter package first, it is what the NGC containers ship).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType

PACKAGES = ("tensorrt", "tensorrt_rtx")
_loaded: ModuleType | None = None


def package_order() -> tuple[str, ...]:
    wanted = os.environ.get("STAC_TENSORRT", "").strip()
    if wanted:
        if wanted not in PACKAGES:
            raise ValueError(f"STAC_TENSORRT must be one of {PACKAGES}, got {wanted!r}")
        return (wanted,)
    return PACKAGES


def available() -> bool:
    """Whether a TensorRT package can be imported (without importing it)."""
    return any(importlib.util.find_spec(name) is not None for name in package_order())


def load() -> ModuleType:
    """The TensorRT module (imported once per process)."""
    global _loaded
    if _loaded is not None:
        return _loaded
    errors = []
    for name in package_order():
        try:
            module = importlib.import_module(name)
        except ImportError as error:
            errors.append(f"{name}: {error}")
            continue
        if name == "tensorrt_rtx":
            _link_rtx_core_library(module)
        _loaded = module
        return module
    raise ImportError("no TensorRT Python package: install 'tensorrt' (datacenter; the NGC containers have it) or "
                      "'tensorrt-rtx' (pip install '.[tensorrt]'); tried " + "; ".join(errors))


def flavour(trt: ModuleType) -> str:
    """'tensorrt' or 'tensorrt_rtx': which package the module came from."""
    return trt.__name__.split(".")[0]


def version(trt: ModuleType) -> str:
    return f"{flavour(trt)} {trt.__version__}"


def _link_rtx_core_library(trt: ModuleType) -> None:
    """TensorRT-RTX's ONNX parser opens the core library by its unversioned name
    (``libtensorrt_rtx.so``) when it imports a plugin node, but the ``tensorrt-rtx-*-libs`` wheel
    ships only ``libtensorrt_rtx.so.1``: without the link, parsing a graph with plugin nodes aborts
    the process. The parser looks beside itself ($ORIGIN), so one symlink there fixes it; it is
    made at install (scripts/setup.sh) or here, and a read-only install gets a clear error."""
    try:
        libs = importlib.import_module("tensorrt_rtx_libs")
    except ImportError:
        return  # libraries installed some other way (e.g. a tarball on LD_LIBRARY_PATH)
    folder = Path(libs.__file__).resolve().parent
    link, target = folder / "libtensorrt_rtx.so", folder / "libtensorrt_rtx.so.1"
    if link.exists() or not target.exists():
        return
    try:
        link.symlink_to(target.name)
    except OSError as error:
        raise ImportError(f"TensorRT-RTX needs {link} -> {target.name} to parse graphs with plugin nodes and it "
                          f"cannot be created ({error}); run: ln -s {target.name} {link}") from error
