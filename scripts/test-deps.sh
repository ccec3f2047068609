#!/usr/bin/env bash
# System tools some tests use, installed where missing (needs root and apt; otherwise those tests
# skip with a message saying what to install): nginx (scale-out through NGINX, `nginx -t` of the
# deployment configs) and libb64 (perf_analyzer); then perf_analyzer itself (tritonclient 2.50.0
# wheel + libcudart, unpacked into .venv/tools, not installed over the venv's tritonclient).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    missing=""
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx"
    dpkg -s libb64-0d >/dev/null 2>&1 || missing="$missing libb64-0d"
    if [ -n "$missing" ]; then
        echo "[test-deps] apt-get install$missing"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    fi
fi
.venv/bin/python -m stac_backend.loadgen.perf install >/dev/null
