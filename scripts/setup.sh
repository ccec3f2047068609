#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv. Idempotent and quick when done.
# Without a GPU, torch is pinned to a CPU-friendly release; set TORCH_SPEC to override
# (e.g. TORCH_SPEC="torch==2.11.0" on a CUDA machine).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${EXTRAS:-dev,engine,serving,export,video,viewer,tensorrt}"

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.stac-setup-$(sha1sum pyproject.toml | cut -c1-12)-${TORCH_SPEC//[^a-zA-Z0-9.]/_}-${EXTRAS//,/_}"
if [ ! -f "$stamp" ]; then
    echo "[setup] installing $TORCH_SPEC and stac-backend[$EXTRAS]"
    python -m pip install -q --upgrade pip
    python -m pip install -q "$TORCH_SPEC"
    python -m pip install -q -e ".[$EXTRAS]"
    # TensorRT-RTX's parser opens libtensorrt_rtx.so by its unversioned name; the shim links it (once)
    python -c "from stac_backend.graph.tensorrt import available, load; available() and load()" || true
    touch "$stamp"
fi
