"""How far FP8 GEMMs move the outputs from bf16, and what they gain in speed, in one run.

Two models, each streamed twice over the same frames (stac, default config) - once in bf16, once with
FP8 GEMMs (model/fp8.py) - and compared:
- the embedded trained checkpoint on a held-out synthetic scene (stac_backend.data.make_sequence):
  depth Abs Rel of FP8 against bf16, and of each against the ground truth (one median scale);
  world points' relative L2 difference; pose: camera translation and rotation differences;
  ATE of each against the ground truth;
- random vggt-1b weights on the same kind of frames at 518x392: the same differences (no ground
  truth for random weights).
Speed: mean milliseconds per step of each precision after a warm-up step, in the same run.

FP8 needs compute capability 8.9+ (``torch._scaled_mm``); elsewhere ``--fp8-mode emulate`` (the
default there) rounds the operands to e4m3 exactly as the FP8 path does and multiplies in the
working dtype: the deviation is FP8's, the speed is not (the JSON says which mode ran).

    python benchmarks/precision_deviation.py --device cuda --out precision_deviation_h100.json
    python benchmarks/precision_deviation.py --device cpu --skip-vggt-1b --frames 8 --out /tmp/p.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from stac_backend.assets import EMBEDDED_CHECKPOINT
from stac_backend.cache import CacheConfig
from stac_backend.data import HELD_OUT_SEED, make_sequence
from stac_backend.data.sequence import to_first_camera_frame
from stac_backend.engine.stream import Stream
from stac_backend.metrics import depth_metrics
from stac_backend.metrics.pose import pose_metrics
from stac_backend.model import build_model
from stac_backend.model.fp8 import fp8_unsupported_reason, use_fp8_gemms
from stac_backend.results import write_result

OUTPUTS = ("depth", "world_points", "extrinsics")


def stream(model, frames: torch.Tensor, chunk: int, device: str) -> tuple[dict[str, torch.Tensor], float]:
    """Outputs of streaming ``frames`` [S, 3, H, W] (float32 on the CPU) and ms per step after the first."""
    s = Stream(model, cache=CacheConfig(policy="stac", chunk=chunk))
    kept: dict[str, list[torch.Tensor]] = {k: [] for k in OUTPUTS}
    times = []
    with torch.inference_mode():
        for start in range(0, frames.shape[0], chunk):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            began = time.perf_counter()
            out = s.push(frames[start:start + chunk].to(device))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - began)
            for k in OUTPUTS:
                kept[k].append(out[k].float().cpu())
    pred = {k: torch.cat(v) for k, v in kept.items()}
    timed = times[1:] or times
    return pred, 1000 * sum(timed) / len(timed)


def rotation_degrees(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle of R_a R_b^T per frame, degrees."""
    relative = a[:, :3, :3].double() @ b[:, :3, :3].double().transpose(1, 2)
    cos = ((relative.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(cos))


def camera_centers(extrinsics: torch.Tensor) -> torch.Tensor:
    r, t = extrinsics[:, :3, :3].double(), extrinsics[:, :3, 3:].double()
    return (-r.transpose(1, 2) @ t)[..., 0]


def deviation(fp8: dict, bf16: dict) -> dict:
    d8, d16 = fp8["depth"], bf16["depth"]
    mask = torch.isfinite(d8) & torch.isfinite(d16) & (d16.abs() > 1e-6)
    p8, p16 = fp8["world_points"].double(), bf16["world_points"].double()
    finite = torch.isfinite(p8).all(-1) & torch.isfinite(p16).all(-1)
    rot = rotation_degrees(fp8["extrinsics"], bf16["extrinsics"])
    centers = (camera_centers(fp8["extrinsics"]) - camera_centers(bf16["extrinsics"])).norm(dim=-1)
    scene = camera_centers(bf16["extrinsics"]).norm(dim=-1).max().clamp(min=1e-9)
    return {
        "depth_abs_rel": float(((d8 - d16).abs()[mask] / d16.abs()[mask]).mean()),
        "world_points_rel_l2": float((p8 - p16)[finite].norm() / p16[finite].norm().clamp(min=1e-12)),
        "translation_diff_mean": float(centers.mean()),
        "translation_diff_rel_to_trajectory": float(centers.mean() / scene),
        "rotation_diff_deg_mean": float(rot.mean()),
        "rotation_diff_deg_max": float(rot.max()),
    }


def against_truth(pred: dict, seq) -> dict:
    m = depth_metrics(pred["depth"].double(), seq.depth.double().cpu(), seq.valid.cpu(), align="median")
    out = {"depth_abs_rel": float(m["abs_rel"])}
    if pred["extrinsics"].shape[0] >= 3:
        out["ate_rmse"] = float(pose_metrics(pred["extrinsics"].double(), seq.extrinsics.double().cpu())["ate_rmse"])
    return out


def compare(name: str, build, frames: torch.Tensor, chunk: int, args, truth=None) -> dict:
    model = build()
    pred16, ms16 = stream(model, frames, chunk, args.device)
    layers = use_fp8_gemms(model, mode=args.fp8_mode)  # same weights, the blocks' GEMMs now in e4m3
    pred8, ms8 = stream(model, frames, chunk, args.device)
    del model
    result = {"frames": int(frames.shape[0]), "image_hw": list(frames.shape[-2:]), "fp8_layers": layers,
              "fp8_vs_bf16": deviation(pred8, pred16),
              "ms_per_step": {"bf16": round(ms16, 3), "fp8": round(ms8, 3)},
              "speedup_fp8": round(ms16 / ms8, 3) if ms8 > 0 else None}
    if truth is not None:
        result["against_ground_truth"] = {"bf16": against_truth(pred16, truth), "fp8": against_truth(pred8, truth)}
    print(f"{name}: {json.dumps(result)}", file=sys.stderr)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--fp8-mode", choices=["scaled_mm", "emulate"], default=None,
                   help="default: scaled_mm where the GPU supports FP8, else emulate")
    p.add_argument("--frames", type=int, default=32, help="frames of the embedded model's held-out scene")
    p.add_argument("--height", type=int, default=84)
    p.add_argument("--width", type=int, default=112)
    p.add_argument("--large-frames", type=int, default=12, help="frames streamed through random vggt-1b")
    p.add_argument("--large-hw", default="392x518")
    p.add_argument("--skip-vggt-1b", action="store_true")
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    reason = fp8_unsupported_reason(args.device)
    if args.fp8_mode is None:
        args.fp8_mode = "emulate" if reason else "scaled_mm"
    if args.fp8_mode == "scaled_mm" and reason:
        p.error(reason)
    dtype = getattr(torch, args.dtype)
    report = {"torch": torch.__version__, "dtype": args.dtype, "fp8_mode": args.fp8_mode,
              "note": "emulate: e4m3 rounding of both GEMM operands without FP8 hardware (deviation only, speed not FP8's)"
              if args.fp8_mode == "emulate" else "torch._scaled_mm, e4m3, per-row scales",
              "models": {}}

    # rendered where the model runs (a GPU renders 518x392 frames in a fraction of the CPU's time)
    seq = to_first_camera_frame(make_sequence(args.frames, args.height, args.width, seed=HELD_OUT_SEED, device=args.device))
    report["models"]["embedded"] = compare(
        "embedded", lambda: build_model(checkpoint=EMBEDDED_CHECKPOINT, device=args.device, dtype=dtype, compile=False),
        seq.images, args.chunk, args, truth=seq)
    if not args.skip_vggt_1b:
        h, w = (int(v) for v in args.large_hw.split("x"))
        large = make_sequence(args.large_frames, h, w, seed=HELD_OUT_SEED, device=args.device).images
        report["models"]["vggt-1b-random"] = compare(
            "vggt-1b-random", lambda: build_model("vggt-1b", device=args.device, dtype=dtype, seed=0, compile=False),
            large, args.chunk, args)
    write_result(args.out, report, "precision_deviation", args.device)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
