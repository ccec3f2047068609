"""Tiny step graphs exported once per run through ``stac export onnx`` (in parallel child processes),
cached in pytest's cache keyed by the exporter's sources, the weights and the export options, and
shared by every test module that asks for the same graph (ONNX Runtime, TensorRT)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
H, W = 56, 84
MODEL_SEED = 11

# name -> (CacheConfig fields, max_frames, attention)
GRAPHS = {
    "full": ({"policy": "full"}, 20, "stac"),
    # small voxels and no confidence bar: a random model's points fill several voxels; retrieval from frame 8
    # (the stac defaults: retrieval before pruning, carried-over pool tokens)
    "stac": ({"policy": "stac", "retrieval_start_frame": 8, "voxel_size": 0.01, "conf_threshold": 0.0,
              "max_voxels": 64}, None, "stac"),
    "heavy_hitter": ({"policy": "heavy_hitter"}, None, "stac"),
    "full_standard": ({"policy": "full"}, 8, "onnx"),  # no stac node: Triton's C++ backends can load it
}

_EXPORTER = {"export": ("command.py", "__main__.py", "onnx_export.py", "onnx_rewrites.py", "step.py"),
             "graph": ("layout.py", "ops.py", "op_specs.py", "onnx_ops.py", "io.py")}


def _fingerprint(checkpoint: Path, extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for folder in ("export", "graph", "model", "cache"):
        for path in sorted((ROOT / "stac_backend" / folder).glob("*.py")):
            if folder in _EXPORTER and path.name not in _EXPORTER[folder]:
                continue  # runtimes and engine builds do not change the exported file
            h.update(path.name.encode())
            h.update(path.read_bytes())
    h.update(checkpoint.read_bytes())
    for mod in ("torch", "onnx", "onnxscript"):
        h.update(__import__(mod).__version__.encode())
    return h.hexdigest()[:16]


def export_command(checkpoint: Path, name: str, out: Path) -> list[str]:
    cache, max_frames, attention = GRAPHS[name]
    cmd = [sys.executable, "-m", "stac_backend.export", "onnx", "--checkpoint", str(checkpoint),
           "--policy", cache["policy"], "--cache-config", json.dumps({k: v for k, v in cache.items() if k != "policy"}),
           "--height", str(H), "--width", str(W), "--no-optimize", "--attention", attention, "--out", str(out)]
    if max_frames:
        cmd += ["--max-frames", str(max_frames)]
    return cmd


def export_graphs(names, model, work: Path, request) -> dict[str, Path]:
    """Paths of the graphs ``names`` exported from ``model`` (exporting the ones not cached yet)."""
    from stac_backend.model import save_checkpoint

    checkpoint = work / "tiny.safetensors"
    save_checkpoint(model, checkpoint)
    cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    cache_dir = Path(cache.mkdir("stac-onnx-export")) if cache is not None else work
    paths, jobs = {}, {}
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for name in names:
        key = _fingerprint(checkpoint, f"{name}{GRAPHS[name]}{H}x{W}")
        paths[name] = cache_dir / f"{name}-{key}.onnx"
        if not paths[name].exists():
            out = work / f"{name}.onnx"
            jobs[name] = (subprocess.Popen(export_command(checkpoint, name, out), env=env, cwd=ROOT,
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), out)
    for name, (proc, out) in jobs.items():
        log, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"export of {name} failed:\n{log[-4000:]}"
        summary = json.loads(log[log.rindex("\n{\n") + 1 :])
        if GRAPHS[name][2] == "stac":
            assert summary["stac_nodes"]["StacAttention"] == model.config.depth
        shutil.copy2(out, paths[name])
    return paths
