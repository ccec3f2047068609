#!/usr/bin/env bash
# Hook for issue #6 (ONNX/TensorRT export): build the TensorRT engine of the model repository.
#
# Called by deploy/prepare.py as `bash build_tensorrt_engines.sh <model_repository>` when
# STAC_BUILD_TENSORRT=1, inside the stac-triton image. It runs plugins/tensorrt/build_repository_engines.sh
# (= python3 -m stac_backend.export.trt_repository): export the repository's model and cache policy to
# ONNX, build <repo>/stac/tensorrt/step.plan with the stac plugins, switch the model to RUNTIME=tensorrt.
# Any failure exits non-zero, which stops the deployment before Triton starts.
#
# Options from the environment (docker-compose passes them through):
#   STAC_TRT_HEIGHT / STAC_TRT_WIDTH  frame size the engine is built for (default 392 x 518)
#   STAC_TRT_MAX_BATCH                streams per engine call (default 4)
#   STAC_TRT_MAX_FRAMES               frames a stream may hold (needed by the full policy)
#   STAC_TRT_PLUGINS                  aot (default: compiled kernels for StacAttention/StacScoreDecay,
#                                     the other stac ops JIT) or jit (every stac op a Python callback)
#   STAC_TRT_FP16=1                   fp16 in standard layers
# NOT EXERCISED WITH TENSORRT HERE: TensorRT is not installable on the project's machines (docs/export.md).
set -euo pipefail
repo="${1:?usage: build_tensorrt_engines.sh MODEL_REPOSITORY}"
python="${STAC_PYTHON:-python3}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
script="$here/../../plugins/tensorrt/build_repository_engines.sh"   # /opt/stac/plugins/... in the image

if ! "$python" -c "import tensorrt" 2>/dev/null; then
    echo "[tensorrt] STAC_BUILD_TENSORRT=1 but the tensorrt Python module is not importable with $python;" \
         "install TensorRT's Python bindings matching the image's TensorRT (pip install tensorrt==<version>)" \
         "or unset STAC_BUILD_TENSORRT. Repository: $repo" >&2
    exit 3
fi
if [[ ! -f "$script" ]]; then
    echo "[tensorrt] $script is missing (the image must contain plugins/tensorrt/)" >&2
    exit 4
fi

args=(--height "${STAC_TRT_HEIGHT:-392}" --width "${STAC_TRT_WIDTH:-518}" --max-batch "${STAC_TRT_MAX_BATCH:-4}"
      --plugins "${STAC_TRT_PLUGINS:-aot}")
if [[ -n "${STAC_TRT_MAX_FRAMES:-}" ]]; then args+=(--max-frames "$STAC_TRT_MAX_FRAMES"); fi
case "${STAC_TRT_FP16:-0}" in 1|true|yes) args+=(--fp16) ;; esac
echo "[tensorrt] building the engine of $repo: ${args[*]}"
exec bash "$script" "$repo" "${args[@]}"
