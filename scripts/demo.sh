#!/usr/bin/env bash
# The main job on the embedded default: start a local Triton server with the small model, stream a
# generated scene through it over gRPC, write depth, point cloud and trajectory to out/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
stac demo --out out/demo "$@"
