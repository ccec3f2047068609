#!/usr/bin/env bash
# Hook for issue #6 (ONNX/TensorRT export): build TensorRT engines for the model repository.
#
# Called by deploy/prepare.py as `bash build_tensorrt_engines.sh <model_repository>` when
# STAC_BUILD_TENSORRT=1, inside the stac-triton image (NGC Triton: TensorRT is there). It must
# write the engines (and any config changes) into the repository and exit non-zero on failure,
# which stops the deployment before Triton starts.
#
# Until #6 lands there is nothing to build: asking for it is an error rather than a silent no-op.
set -euo pipefail
repo="${1:?usage: build_tensorrt_engines.sh MODEL_REPOSITORY}"
echo "[tensorrt] STAC_BUILD_TENSORRT=1 but the TensorRT export is not implemented yet (issue #6); repository: $repo" >&2
exit 3
