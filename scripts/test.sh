#!/usr/bin/env bash
# Set up (if needed) and run the test suite: a real tritonserver, gRPC clients, perf_analyzer and
# NGINX on this machine, CPU only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/test-deps.sh
. .venv/bin/activate
python -m pytest -q "$@"
