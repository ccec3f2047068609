"""Build the TensorRT engine of a rendered model repository (what the deployment hook runs).

    stac export repository /models [--height 392 --width 518 --max-batch 4] [--plugins python|aot]

1. reads ``<repo>/stac/config.pbtxt`` parameters (PRESET, CHECKPOINT, CACHE_CONFIG, ...);
2. exports the step graph of that model and cache to ``<repo>/stac/tensorrt/step.onnx`` (+ .data);
3. builds ``<repo>/stac/tensorrt/step.plan`` with the stac plugins (``tensorrt`` or ``tensorrt_rtx``);
4. switches the model to it: parameters RUNTIME=tensorrt, TRT_PLAN=tensorrt/step.plan.
Any failure raises (the command exits non-zero and the deployment stops before Triton starts).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

_PARAM = re.compile(r'^parameters: \{ key: "(?P<key>[A-Z_]+)" value: \{ string_value: (?P<value>".*") \} \}$', re.M)


def read_parameters(config_text: str) -> dict[str, str]:
    return {m["key"]: json.loads(m["value"]) for m in _PARAM.finditer(config_text)}


def set_parameters(config_text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        line = f'parameters: {{ key: "{key}" value: {{ string_value: {json.dumps(value)} }} }}'
        pattern = re.compile(rf'^parameters: \{{ key: "{key}" .*$', re.M)
        config_text = pattern.sub(line, config_text) if pattern.search(config_text) else config_text.rstrip("\n") + "\n" + line + "\n"
    return config_text


def build_repository_engine(repository: Path, *, model: str = "stac", height: int = 392, width: int = 518,
                            max_frames: Optional[int] = None, max_batch: int = 4, fp16: bool = False,
                            plugins: str = "python") -> Path:
    import torch

    from ..cache import CacheConfig
    from ..model import build_model
    from .onnx_export import export_step
    from .trt_build import build_engine

    model_dir = Path(repository) / model
    config_path = model_dir / "config.pbtxt"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: render the repository first")
    params = read_parameters(config_path.read_text())
    checkpoint = params.get("CHECKPOINT", "")
    if checkpoint and not Path(checkpoint).is_absolute():
        checkpoint = str(model_dir / checkpoint)
    network = build_model(params.get("PRESET") or None, checkpoint=checkpoint or None, dtype=torch.float32)
    cache = CacheConfig.from_dict(json.loads(params.get("CACHE_CONFIG", "") or "{}"))
    out = model_dir / "tensorrt"
    onnx_path = export_step(network, cache, out / "step.onnx", height=height, width=width, max_frames=max_frames)
    del network
    plan = build_engine(onnx_path, out / "step.plan", max_batch=max_batch, fp16=fp16, plugins=plugins)
    config_path.write_text(set_parameters(config_path.read_text(), {"RUNTIME": "tensorrt", "TRT_PLAN": "tensorrt/step.plan"}))
    return plan
