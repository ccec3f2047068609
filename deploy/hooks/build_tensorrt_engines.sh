#!/usr/bin/env bash
# Build the TensorRT engine of the model repository and switch its model to RUNTIME=tensorrt.
#
# Called by deploy/prepare.py as `bash build_tensorrt_engines.sh <model_repository>` when
# STAC_BUILD_TENSORRT=1, inside the stac-triton image. It runs `stac export repository` (= python3 -m
# stac_backend.export repository): export the repository's model and cache policy to ONNX, build
# <repo>/stac/tensorrt/step.plan with the stac plugins, switch the model to RUNTIME=tensorrt. The same
# command works with datacenter `tensorrt` (the NGC image) and with `tensorrt_rtx`.
# Any failure exits non-zero, which stops the deployment before Triton starts.
#
# Options from the environment (docker-compose passes them through):
#   STAC_TRT_HEIGHT / STAC_TRT_WIDTH  frame size the engine is built for (default 392 x 518)
#   STAC_TRT_MAX_BATCH                streams per engine call (default 4)
#   STAC_TRT_MAX_FRAMES               frames a stream may hold (needed by the full policy)
#   STAC_TRT_PLUGINS                  python (default: every stac op an IPluginV3 Python plugin) or aot
#                                     (datacenter TensorRT >= 10.10: StacAttention/StacScoreDecay compiled)
#   STAC_TRT_FP16=1                   fp16 in standard layers
set -euo pipefail
repo="${1:?usage: build_tensorrt_engines.sh MODEL_REPOSITORY}"
python="${STAC_PYTHON:-python3}"

if ! "$python" -c "from stac_backend.graph.tensorrt import load; load()" 2>/dev/null; then
    echo "[tensorrt] STAC_BUILD_TENSORRT=1 but no TensorRT Python package is importable with $python;" \
         "install TensorRT's Python bindings matching the image's TensorRT (pip install tensorrt==<version>)" \
         "or tensorrt-rtx, or unset STAC_BUILD_TENSORRT. Repository: $repo" >&2
    exit 3
fi

plugins="${STAC_TRT_PLUGINS:-python}"
[[ "$plugins" == jit ]] && plugins=python   # the former name of the all-Python choice
args=(--height "${STAC_TRT_HEIGHT:-392}" --width "${STAC_TRT_WIDTH:-518}" --max-batch "${STAC_TRT_MAX_BATCH:-4}"
      --plugins "$plugins")
if [[ -n "${STAC_TRT_MAX_FRAMES:-}" ]]; then args+=(--max-frames "$STAC_TRT_MAX_FRAMES"); fi
case "${STAC_TRT_FP16:-0}" in 1|true|yes) args+=(--fp16) ;; esac
echo "[tensorrt] building the engine of $repo: ${args[*]}"
exec "$python" -m stac_backend.export repository "$repo" "${args[@]}"
