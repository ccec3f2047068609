#!/usr/bin/env bash
# Build the TensorRT engine of a rendered model repository and switch its model to RUNTIME=tensorrt.
# For docker-compose's prepare step (NGC Triton image, TensorRT present): deploy/hooks/build_tensorrt_engines.sh
# should exec this (or `python3 -m stac_backend.export.trt_repository "$repo"` directly). NOT EXERCISED HERE.
#
#   bash plugins/tensorrt/build_repository_engines.sh /models [--height 392 --width 518 --max-batch 4 --fp16]
set -euo pipefail
repo="${1:?usage: build_repository_engines.sh MODEL_REPOSITORY [options]}"
shift
python3 -c "import tensorrt" 2>/dev/null || { echo "[tensorrt] the tensorrt Python module is missing in this image" >&2; exit 3; }
exec python3 -m stac_backend.export.trt_repository "$repo" "$@"
