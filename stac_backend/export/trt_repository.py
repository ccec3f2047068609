"""Build the TensorRT engine for a rendered model repository (docker-compose ``prepare`` step).

NOT EXERCISED HERE (no TensorRT on the project's machines). Inside the NGC-based image:

    python3 -m stac_backend.export.trt_repository /models [--height 392 --width 518 --max-batch 4] [--plugins aot|jit]

1. reads ``<repo>/stac/config.pbtxt`` parameters (PRESET, CHECKPOINT, CACHE_CONFIG, ...);
2. exports the step graph of that model and cache to ``<repo>/stac/tensorrt/step.onnx`` (+ .data);
3. builds ``<repo>/stac/tensorrt/step.plan`` (stac plugins: ``trt_plugins``);
4. switches the model to it: parameters RUNTIME=tensorrt, TRT_PLAN=tensorrt/step.plan.
Exit status non-zero on any failure (the deployment then stops before Triton starts).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

_PARAM = re.compile(r'^parameters: \{ key: "(?P<key>[A-Z_]+)" value: \{ string_value: (?P<value>".*") \} \}$', re.M)


def read_parameters(config_text: str) -> dict[str, str]:
    return {m["key"]: json.loads(m["value"]) for m in _PARAM.finditer(config_text)}


def set_parameters(config_text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        line = f'parameters: {{ key: "{key}" value: {{ string_value: {json.dumps(value)} }} }}'
        pattern = re.compile(rf'^parameters: \{{ key: "{key}" .*$', re.M)
        config_text = pattern.sub(line, config_text) if pattern.search(config_text) else config_text.rstrip("\n") + "\n" + line + "\n"
    return config_text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repository", type=Path)
    parser.add_argument("--model", default="stac")
    parser.add_argument("--height", type=int, default=392)
    parser.add_argument("--width", type=int, default=518)
    parser.add_argument("--max-frames", type=int, default=None, help="full policy: frames a stream may hold")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--plugins", choices=["aot", "jit"], default="aot",
                        help="aot: compiled kernels for StacAttention/StacScoreDecay (the rest JIT); jit: all JIT")
    args = parser.parse_args(argv)

    import torch

    from ..cache import CacheConfig
    from ..model import build_model
    from .onnx_export import export_step
    from .trt_build import build_engine

    model_dir = args.repository / args.model
    config_path = model_dir / "config.pbtxt"
    params = read_parameters(config_path.read_text())
    checkpoint = params.get("CHECKPOINT", "")
    if checkpoint and not Path(checkpoint).is_absolute():
        checkpoint = str(model_dir / checkpoint)
    model = build_model(params.get("PRESET") or None, checkpoint=checkpoint or None, dtype=torch.float32)
    cache = CacheConfig.from_dict(json.loads(params.get("CACHE_CONFIG", "") or "{}"))
    out = model_dir / "tensorrt"
    onnx_path = export_step(model, cache, out / "step.onnx", height=args.height, width=args.width, max_frames=args.max_frames)
    del model
    build_engine(onnx_path, out / "step.plan", max_batch=args.max_batch, fp16=args.fp16, plugins=args.plugins)
    config_path.write_text(set_parameters(config_path.read_text(), {"RUNTIME": "tensorrt", "TRT_PLAN": "tensorrt/step.plan"}))
    print(f"[tensorrt] {out / 'step.plan'} built; {config_path} now uses RUNTIME=tensorrt", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
