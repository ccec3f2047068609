"""Loading and saving checkpoints - safely and strictly.

Accepted files: ``.pt`` / ``.pth`` (a plain state dict, or one nested under ``model`` or
``state_dict``; read with ``torch.load(weights_only=True)``, so no pickled code ever runs) and
``.safetensors``. VGGT-1B, StreamVGGT and STream3R checkpoints share one module layout and load
into the ``vggt-1b`` preset. A checkpoint written by ``save_checkpoint`` also records its
``ModelConfig``, so ``build_model(checkpoint=...)`` needs nothing else.

Loading is strict: every missing, unexpected or mis-shaped tensor is listed in one error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .config import ModelConfig, get_preset
from .compiled import compile_static_parts
from .compiled import enabled_by_env as compile_by_env
from .cuda_graphs import enabled_by_env, graph_static_parts
from .fp8 import enabled_by_env as fp8_by_env
from .fp8 import use_fp8_gemms
from .vggt import VGGT

CONFIG_METADATA_KEY = "stac_model_config"
PathLike = Union[str, Path]


class CheckpointMismatchError(ValueError):
    """A state dict does not match the model: lists every offending tensor."""

    def __init__(self, missing: list[str], unexpected: list[str], mis_shaped: list[tuple[str, tuple, tuple]], source: str):
        self.missing, self.unexpected, self.mis_shaped = missing, unexpected, mis_shaped
        lines = [f"checkpoint {source} does not match the model:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected))
        if mis_shaped:
            lines.append(
                f"  wrong shape ({len(mis_shaped)}): "
                + ", ".join(f"{k} (checkpoint {tuple(a)} vs model {tuple(b)})" for k, a, b in mis_shaped)
            )
        super().__init__("\n".join(lines))


def read_state_dict(path: PathLike) -> tuple[dict[str, Tensor], Optional[ModelConfig]]:
    """Tensors of a checkpoint file, and the ModelConfig it records (if any)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    config = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        if CONFIG_METADATA_KEY in meta:
            config = ModelConfig.from_dict(json.loads(meta[CONFIG_METADATA_KEY]))
        return state, config
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused or a corrupt file
        raise ValueError(f"cannot read {path} as a weights-only torch checkpoint: {exc}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("config"), str):
        config = ModelConfig.from_dict(json.loads(obj["config"]))
    for nest in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(nest), dict):
            obj = obj[nest]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds no state dict (a mapping of names to tensors)")
    # Checkpoints saved from DistributedDataParallel prefix every name with "module.".
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj, config


def check_state_dict(model: nn.Module, state: dict[str, Tensor], source: str = "state dict") -> None:
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    mis_shaped = sorted(
        (k, tuple(state[k].shape), tuple(expected[k].shape))
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mis_shaped:
        raise CheckpointMismatchError(missing, unexpected, mis_shaped, source)


def load_state_dict_strict(model: nn.Module, state: dict[str, Tensor], source: str = "state dict") -> None:
    check_state_dict(model, state, source)
    model.load_state_dict(state, strict=True)


def load_checkpoint(model: nn.Module, path: PathLike) -> None:
    state, _ = read_state_dict(path)
    load_state_dict_strict(model, state, str(path))


def save_checkpoint(model: VGGT, path: PathLike, dtype: Optional[torch.dtype] = None) -> None:
    """Write weights plus the model's config (``.safetensors`` or ``.pt``); ``dtype`` stores the
    floating-point weights in another precision (e.g. float16 to ship a small file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    config_json = model.config.to_json()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={CONFIG_METADATA_KEY: config_json})
    else:
        torch.save({"model": state, "config": config_json}, str(path))


def build_model(
    preset: Union[str, ModelConfig, None] = None,
    checkpoint: Optional[PathLike] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: Optional[int] = 0,
    cuda_graphs: Optional[bool] = None,
    compile: Optional[bool] = None,
    fp8: Optional[bool] = None,
) -> VGGT:
    """A VGGT in eval mode from a preset name or config, optionally with a checkpoint's weights.

    With only a checkpoint that records its config, the config comes from the checkpoint. With
    neither weights nor a seed, weights are random; ``seed`` makes random weights reproducible.
    ``cuda_graphs``: on CUDA, give the cache-free parts CUDA graphs (``cuda_graphs.py``; None: only
    if ``STAC_CUDA_GRAPHS=1``); ``model.cuda_graph_stats`` then counts captures and replays.
    ``compile``: torch.compile the cache-free parts (``compiled.py``; None: only if
    ``STAC_COMPILE=1``); ``model.compiled_parts`` then holds the counters. With both, the graphs
    capture the compiled parts' kernels (one replay per part instead of one launch per kernel).
    ``fp8``: FP8 GEMMs for the blocks' large linear layers (``fp8.py``; None: only if
    ``STAC_FP8=1``); refused with a RuntimeError on a device without FP8 support.
    """
    state, recorded = (None, None)
    if checkpoint is not None:
        state, recorded = read_state_dict(checkpoint)
    if preset is None:
        if recorded is None:
            raise ValueError("give a preset or config, or a checkpoint that records its config")
        config = recorded
    else:
        config = get_preset(preset) if isinstance(preset, str) else preset
    if seed is not None and state is None:
        torch.manual_seed(seed)
    model = VGGT(config)
    if state is not None:
        load_state_dict_strict(model, state, str(checkpoint))
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        prefer_low_overhead_attention()
    model = model.to(device=device, dtype=dtype).eval()
    if fp8 if fp8 is not None else fp8_by_env():
        use_fp8_gemms(model)
    if compile if compile is not None else compile_by_env():
        compile_static_parts(model)
    # After compiling: a graph then captures the compiled kernels (graphs first would be replaced).
    if on_cuda and (cuda_graphs if cuda_graphs is not None else enabled_by_env()):
        graph_static_parts(model)
    return model


def prefer_low_overhead_attention() -> None:
    """Keep PyTorch's attention off the cuDNN backend in this process (STAC_SDPA_CUDNN=1 keeps it on).

    On the H100 (torch 2.11, docs/performance.md) cuDNN's attention spent ~0.9 ms of host time per
    call against ~0.17 ms on the GPU; a step makes ~90 such calls, so one stream was bound by the
    host. The flash and memory-efficient backends cost a few microseconds of host time per call.
    """
    if os.environ.get("STAC_SDPA_CUDNN", "0") != "1":
        torch.backends.cuda.enable_cudnn_sdp(False)
