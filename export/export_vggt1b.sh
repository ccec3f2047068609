#!/usr/bin/env bash
# Export the vggt-1b streaming step (fp32, external data) and check it on ONNX Runtime against torch.
#   bash export/export_vggt1b.sh [--checkpoint model.safetensors] [--policy stac|full|heavy_hitter]
# Without --checkpoint: random weights (seed 0). Needs ~11 GiB RAM for the export and ~17 GiB for the
# check; measured times are in docs/export.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${STAC_EXPORT_OUT:-out/vggt1b}"
weights=(--random-weights)
policy=stac
while [ $# -gt 0 ]; do
    case "$1" in
        --checkpoint) weights=(--checkpoint "$2"); shift 2 ;;
        --policy) policy="$2"; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
extra=()
[ "$policy" = full ] && extra=(--max-frames "${STAC_MAX_FRAMES:-16}")
mkdir -p "$out"
python -m stac_backend.export onnx --preset vggt-1b "${weights[@]}" --policy "$policy" "${extra[@]}" \
    --height 392 --width 518 --out "$out/${policy}_step.onnx" | tee "$out/${policy}_export.json"
python export/run_exported.py "$out/${policy}_step.onnx" "${weights[@]}" --frames 2 --chunk 2 --threads "$(nproc)" --low-memory \
    | tee "$out/${policy}_check.json"
