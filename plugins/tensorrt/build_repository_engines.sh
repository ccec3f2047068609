#!/usr/bin/env bash
# Build the TensorRT engine of a rendered model repository and switch its model to RUNTIME=tensorrt.
# docker-compose's prepare step reaches this through deploy/hooks/build_tensorrt_engines.sh
# (STAC_BUILD_TENSORRT=1), which maps STAC_TRT_* variables to these options. NOT EXERCISED HERE.
#
#   bash plugins/tensorrt/build_repository_engines.sh /models [--height 392 --width 518 --max-batch 4 --fp16 --plugins aot|jit]
set -euo pipefail
repo="${1:?usage: build_repository_engines.sh MODEL_REPOSITORY [options]}"
shift
python="${STAC_PYTHON:-python3}"
"$python" -c "import tensorrt" 2>/dev/null || { echo "[tensorrt] the tensorrt Python module is missing in this image" >&2; exit 3; }
exec "$python" -m stac_backend.export.trt_repository "$repo" "$@"
