"""Render (and optionally fill) model_repository_onnx/: the exported step on Triton's own backends.

    python export/build_onnx_repository.py                         # configs + initial state only (as checked in)
    python export/build_onnx_repository.py --checkpoint vggt1b.safetensors --model-files   # + 1/model.onnx
    python export/build_onnx_repository.py --random-weights --model-files --tensorrt        # + 1/model.plan (needs TensorRT)

Two models, the ``full`` policy with a small budget (8 frames of 518x392 for vggt-1b) and standard-op
attention, so that stock backends run the graph with no plugin at all:
``stac_full_ort`` (onnxruntime_onnx) and ``stac_full_trt`` (tensorrt_plan). The per-stream cache is
Triton's implicit state; every request copies it out and back in (the cost is in each config and
in docs/export.md). Cannot run on the project's machines: the bundled tritonserver has only the
Python backend; tests/test_export_repository.py validates the configs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository_onnx")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--model-files", action="store_true", help="export 1/model.onnx (needs weights)")
    parser.add_argument("--tensorrt", action="store_true", help="also build 1/model.plan (needs TensorRT)")
    args = parser.parse_args(argv)

    from stac_backend.export.triton_variant import PRODUCTION_LAYOUT, VARIANTS, write_variant

    layout = PRODUCTION_LAYOUT
    onnx_file = plan_file = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_files or args.tensorrt:
            if not args.checkpoint and not args.random_weights:
                parser.error("--model-files needs --checkpoint or --random-weights")
            import torch

            from stac_backend.export.onnx_export import export_step
            from stac_backend.model import build_model

            model = build_model("vggt-1b" if not args.checkpoint else None, checkpoint=args.checkpoint, dtype=torch.float32)
            onnx_file = export_step(model, layout.cache, Path(tmp) / "model.onnx", height=layout.height,
                                    width=layout.width, max_frames=layout.max_frames, standard_attention=True)
            del model
            if args.tensorrt:
                from stac_backend.export.trt_build import build_engine

                plan_file = build_engine(onnx_file, Path(tmp) / "model.plan", max_batch=VARIANTS[1].max_batch_size)
        for settings in VARIANTS:
            model_file = onnx_file if settings.platform == "onnxruntime_onnx" else plan_file
            print("wrote", write_variant(args.repository, layout, settings, model_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
