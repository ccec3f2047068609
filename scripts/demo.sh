#!/usr/bin/env bash
# The main job on the embedded default: stream a generated scene through the small model and
# write depth, point cloud and trajectory to out/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
stac stream synthetic:32 --out out/demo --chunk-size 4 "$@"
