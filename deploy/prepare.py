"""Prepare the model repository for Triton: the one-shot ``prepare`` service of docker-compose.yml.

1. Finds the checkpoint: ``<repository>/stac/checkpoints/<file>`` if already there, else
   ``<checkpoint-dir>/<file>`` (``STAC_CHECKPOINT_FILE``, default ``vggt-1b.safetensors``), which
   is copied into the repository (atomically: copy to a temporary name, then rename).
2. Validates it against the model without loading the weights into a model: every tensor name
   and shape is compared with the preset's (the same strict check the server applies when it
   loads; all mismatches are listed). ``.safetensors`` headers only; ``.pt`` via a weights-only,
   memory-mapped load.
3. Renders ``<repository>/stac/config.pbtxt`` and ``1/model.py`` with the same renderer as
   ``model_repository/`` in git (``stac_backend.serving.repository``): production settings
   (KIND_GPU, bf16, vggt-1b, STAC cache) with overrides from the environment:
   ``STAC_MAX_STREAMS``, ``STAC_MAX_CACHE_BYTES``, ``STAC_CACHE_CONFIG`` (JSON),
   ``STAC_INSTANCE_COUNT``, ``STAC_IDLE_TTL_S``, ``STAC_MAX_IMAGE_PIXELS``, ``STAC_DTYPE``,
   ``STAC_PRESET``, ``STAC_OUTPUT_DTYPE`` (float32 | float16: the dense outputs' wire dtype),
   ``STAC_FRAME_SIZE`` (HxW: other sizes are refused by Triton), ``STAC_STREAM_KEYS`` (0: no keys).
4. Runs the TensorRT hook when ``STAC_BUILD_TENSORRT=1``: ``deploy/hooks/build_tensorrt_engines.sh``.
5. Writes ``<repository>/stac/PREPARED.json`` (checkpoint size and sha256, settings, time).

Exit code 0 only if all of that worked, so Triton (``depends_on: service_completed_successfully``)
never starts on a missing or mismatched checkpoint.

    python deploy/prepare.py --repository /srv/stac/models --checkpoint-dir checkpoints
    python deploy/prepare.py --repository /tmp/repo --checkpoint-dir /tmp --checkpoint-file tiny.safetensors --preset ""
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "stac_backend").is_dir():
    sys.path.insert(0, str(ROOT))

HOOK = Path(__file__).resolve().parent / "hooks" / "build_tensorrt_engines.sh"


def log(message: str) -> None:
    print(f"[prepare] {message}", flush=True)


def settings_from_env(env=os.environ, preset=None):
    from stac_backend.serving.repository import PRODUCTION

    s = dataclasses.replace(PRODUCTION, cache_config=dict(PRODUCTION.cache_config))
    if preset is not None:
        s.preset = preset
    elif env.get("STAC_PRESET") is not None:
        s.preset = env["STAC_PRESET"]
    if s.preset != PRODUCTION.preset:  # the frame size clients read from the config follows the preset
        from stac_backend.model import PRESETS

        s.image_size = PRESETS[s.preset].img_size if s.preset in PRESETS else 0
    if env.get("STAC_DTYPE"):
        s.dtype = env["STAC_DTYPE"]
    if env.get("STAC_MAX_STREAMS"):
        s.max_streams = int(env["STAC_MAX_STREAMS"])
        s.max_batch_size = max(1, min(s.max_batch_size, s.max_streams))
    if env.get("STAC_MAX_CACHE_BYTES"):
        s.max_cache_bytes = int(env["STAC_MAX_CACHE_BYTES"])
    if env.get("STAC_CACHE_CONFIG"):
        s.cache_config = json.loads(env["STAC_CACHE_CONFIG"])
    if env.get("STAC_INSTANCE_COUNT"):
        s.instance_count = int(env["STAC_INSTANCE_COUNT"])
    if env.get("STAC_IDLE_TTL_S"):
        s.idle_ttl_s = float(env["STAC_IDLE_TTL_S"])
    if env.get("STAC_FRAME_SIZE"):
        height, width = (int(v) for v in env["STAC_FRAME_SIZE"].lower().split("x"))
        s.frame_size = (height, width)
    if env.get("STAC_STREAM_KEYS"):
        s.stream_keys = env["STAC_STREAM_KEYS"].strip().lower() not in ("0", "false", "no")
    if env.get("STAC_MAX_IMAGE_PIXELS"):
        s.max_image_pixels = int(env["STAC_MAX_IMAGE_PIXELS"])
    if env.get("STAC_INSTANCE_KIND"):
        s.instance_kind = env["STAC_INSTANCE_KIND"]
    if env.get("STAC_DEVICE"):
        s.device = env["STAC_DEVICE"]
    if env.get("STAC_OUTPUT_DTYPE"):
        s.output_dtype = env["STAC_OUTPUT_DTYPE"]
    if env.get("STAC_OUTPUT_DEVICE"):
        s.output_device = env["STAC_OUTPUT_DEVICE"]
    if env.get("STAC_DECOUPLED"):
        value = env["STAC_DECOUPLED"].strip().lower()
        if value not in ("0", "1", "true", "false", "yes", "no"):
            raise ValueError(f"STAC_DECOUPLED must be 0 or 1, got {env['STAC_DECOUPLED']!r}")
        s.decoupled = value in ("1", "true", "yes")
    from stac_backend.cache import CacheConfig

    CacheConfig.from_dict(s.cache_config)  # refuse a bad cache config here, not at model load
    return s


def tensor_shapes(path: Path) -> tuple[dict[str, tuple], object]:
    """Names and shapes of a checkpoint's tensors without materialising them, and its recorded config."""
    from stac_backend.model.checkpoint import CONFIG_METADATA_KEY
    from stac_backend.model.config import ModelConfig

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        config = ModelConfig.from_dict(json.loads(meta[CONFIG_METADATA_KEY])) if CONFIG_METADATA_KEY in meta else None
        return shapes, config
    from stac_backend.model.checkpoint import read_state_dict

    state, config = read_state_dict(path)  # weights_only torch.load
    return {k: tuple(v.shape) for k, v in state.items()}, config


def validate_checkpoint(path: Path, preset: str) -> dict:
    """Compare every tensor name and shape with the model built on the meta device (no memory)."""
    import torch

    from stac_backend.model.checkpoint import CheckpointMismatchError
    from stac_backend.model.config import get_preset
    from stac_backend.model.vggt import VGGT

    shapes, recorded = tensor_shapes(path)
    config = get_preset(preset) if preset else recorded
    if config is None:
        raise ValueError(f"{path} records no model config; set STAC_PRESET (e.g. vggt-1b)")
    with torch.device("meta"):
        model = VGGT(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if shapes and all(k.startswith("module.") for k in shapes):
        shapes = {k[len("module.") :]: v for k, v in shapes.items()}
    missing = sorted(k for k in expected if k not in shapes)
    unexpected = sorted(k for k in shapes if k not in expected)
    mis_shaped = sorted((k, shapes[k], expected[k]) for k in expected if k in shapes and shapes[k] != expected[k])
    if missing or unexpected or mis_shaped:
        raise CheckpointMismatchError(missing, unexpected, mis_shaped, str(path))
    return {"tensors": len(shapes), "parameters": int(sum(int(torch.Size(s).numel()) for s in shapes.values()))}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def place_checkpoint(repository: Path, checkpoint_dir: Path | None, name: str) -> Path:
    target = repository / "stac" / "checkpoints" / name
    source = checkpoint_dir / name if checkpoint_dir else None
    if source is not None and source.is_file():
        if target.is_file() and target.stat().st_size == source.stat().st_size and sha256(target) == sha256(source):
            log(f"checkpoint already in place: {target}")
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        log(f"copying {source} -> {target}")
        shutil.copyfile(source, partial)
        os.replace(partial, target)
        return target
    if target.is_file():
        log(f"using the checkpoint in the repository: {target}")
        return target
    where = [str(target)] + ([str(source)] if source is not None else [])
    raise FileNotFoundError(f"checkpoint {name} not found (looked at {', '.join(where)}): put the weights there "
                            "or set STAC_CHECKPOINT_DIR / STAC_CHECKPOINT_FILE")


def run_tensorrt_hook(repository: Path, env=os.environ) -> str:
    if env.get("STAC_BUILD_TENSORRT", "0") not in ("1", "true", "yes"):
        log("TensorRT engines: skipped (STAC_BUILD_TENSORRT is not set)")
        return "skipped"
    log(f"TensorRT engines: running {HOOK}")
    subprocess.run(["bash", str(HOOK), str(repository)], check=True)
    return "built"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="where a new checkpoint is taken from")
    p.add_argument("--checkpoint-file", default=os.environ.get("STAC_CHECKPOINT_FILE", "vggt-1b.safetensors"))
    p.add_argument("--preset", default=None, help="model preset to validate against ('' = the checkpoint's own config)")
    p.add_argument("--check-only", action="store_true", help="validate; write nothing")
    args = p.parse_args(argv)

    from stac_backend.serving.repository import write_repository

    started = time.time()
    settings = settings_from_env(preset=args.preset)
    name = Path(args.checkpoint_file).name  # a file name only: nothing outside the two folders is read
    if args.check_only:
        source = (args.checkpoint_dir / name) if args.checkpoint_dir and (args.checkpoint_dir / name).is_file() \
            else args.repository / "stac" / "checkpoints" / name
        info = validate_checkpoint(source, settings.preset)
        log(f"{source}: {info['tensors']} tensors, {info['parameters']:,} parameters match preset {settings.preset or '(recorded)'}")
        return 0
    checkpoint = place_checkpoint(args.repository, args.checkpoint_dir, name)
    info = validate_checkpoint(checkpoint, settings.preset)
    log(f"{checkpoint.name}: {info['tensors']} tensors, {info['parameters']:,} parameters match preset "
        f"{settings.preset or '(recorded)'}")
    write_repository(args.repository, settings, checkpoint_file=checkpoint)
    log(f"rendered {args.repository / 'stac' / 'config.pbtxt'} (max_streams {settings.max_streams}, cache "
        f"{json.dumps(settings.cache_config)}, {settings.instance_count} x {settings.instance_kind})")
    tensorrt = run_tensorrt_hook(args.repository)
    manifest = {
        "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 2),
        "checkpoint": {"file": str(checkpoint.relative_to(args.repository / "stac")), "bytes": checkpoint.stat().st_size,
                       "sha256": sha256(checkpoint), **info},
        "settings": dataclasses.asdict(settings),
        "tensorrt": tensorrt,
    }
    (args.repository / "stac" / "PREPARED.json").write_text(json.dumps(manifest, indent=1))
    log("done")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # noqa: BLE001 - one clear line for `docker compose logs prepare`
        print(f"[prepare] FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
