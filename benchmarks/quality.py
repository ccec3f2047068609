"""Reconstruction quality of every cache policy against ground truth, on held-out synthetic
streams with revisits, plus a trivial baseline. Writes JSON and plots.

    python benchmarks/quality.py --frames 300 --out docs/benchmarks/quality_cpu.json
    python benchmarks/quality.py --frames 300 --point-frame-stride 4 --icp-iterations 10 --max-points 5000 \
        --icp-max-points 2000 --icp-max-target-points 20000 --out docs/benchmarks/quality_cpu.json   # a loaded CPU

Model: the embedded trained ``small`` checkpoint unless --checkpoint is given. Scenes: the held-out
seeds from 1,000,000 on (never seen in training), or with ``--scenes validation`` the validation
seeds from 2,000,000 on (also never trained on; compare checkpoints there, not on the held-out
scenes the docs report), looped trajectories (the camera returns to where it started, so bounded
caches must remember - or retrieve - the beginning). Metrics as the field reports them
(stac_backend.metrics.evaluate_sequence): accuracy / completeness / normal consistency after
Sim(3) + ICP, depth Abs Rel and delta < 1.25 after median scaling, ATE / RPE, and over every pair
of frames VGGT's AUC@30 with the median pair rotation / translation-direction errors.
Baseline for depth: each frame predicted as the constant median of its ground-truth depth.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from stac_backend.assets import EMBEDDED_CHECKPOINT
from stac_backend.cache import CacheConfig
from stac_backend.data import SPLITS, make_sequence, to_first_camera_frame, unproject_depth
from stac_backend.engine import Stream
from stac_backend.metrics import evaluate_sequence, pose_metrics
from stac_backend.model import build_model
from stac_backend.results import write_result


def configs(args) -> dict[str, CacheConfig]:
    stac = json.loads(args.stac_overrides) if args.stac_overrides else {}
    every = {
        "full": CacheConfig(policy="full"),
        "window": CacheConfig(policy="window", window=8),
        "sink_window": CacheConfig(policy="sink_window"),
        "heavy_hitter": CacheConfig(policy="heavy_hitter"),
        "stac": CacheConfig(policy="stac", **stac),
    }
    chosen = [name.strip() for name in args.policies.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(every))
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; choose from {sorted(every)}")
    return {name: every[name] for name in chosen}


def run(model, seq, config, chunk=4):
    stream = Stream(model, cache=config)
    outs, peak = [], 0
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, seq.num_frames, chunk):
            outs.append(stream.push(seq.images[i : i + chunk].to(device)))
            peak = max(peak, stream.memory_bytes())
    seconds = time.perf_counter() - t0
    pred = {k: torch.cat([o[k] for o in outs]).float().cpu()
            for k in ("depth", "world_points", "extrinsics", "intrinsics", "world_points_conf")}
    stats = {k: v for k, v in stream.cache.stats().items() if isinstance(v, (int, float))}
    return pred, {"peak_cache_bytes": peak, "seconds": seconds, "frames_per_second": seq.num_frames / seconds, "cache_stats": stats}


# How far into a stream poses stay right: ATE over the first N frames (each prefix aligned on its own).
ATE_PREFIXES = (24, 48, 96, 150)


def ate_by_prefix(extrinsics, gt_extrinsics) -> dict[str, float]:
    n = gt_extrinsics.shape[0]
    return {str(k): float(pose_metrics(extrinsics[:k], gt_extrinsics[:k])["ate_rmse"]) for k in ATE_PREFIXES if k < n}


# The point metrics scored a second way: the predicted depth unprojected with the predicted cameras.
POINT_KEYS = ("acc_mean", "comp_mean", "nc_mean", "align_scale")


def score(pred: dict, seq, args) -> dict:
    """Depth and poses on every frame; points on every ``--point-frame-stride``-th frame, with the caps
    given, from the point head (the top-level acc/comp/NC) and from depth + predicted cameras
    (``points_from_depth``: VGGT reports the latter as the more accurate of its two point estimates)."""
    metrics = evaluate_sequence({"depth": pred["depth"], "extrinsics": pred["extrinsics"]}, seq)
    metrics["ate_rmse_first_frames"] = ate_by_prefix(pred["extrinsics"], seq.extrinsics)
    k = args.point_frame_stride
    points_gt = {"world_points": seq.world_points[::k], "valid": seq.valid[::k]}
    caps = dict(icp_iterations=args.icp_iterations, max_points=args.max_points, max_reference_points=args.max_reference_points,
                icp_max_points=args.icp_max_points, icp_max_target_points=args.icp_max_target_points)
    metrics |= evaluate_sequence({"world_points": pred["world_points"][::k]}, points_gt, **caps)
    from_depth = unproject_depth(pred["depth"][::k], pred["extrinsics"][::k], pred["intrinsics"][::k])
    depth_metrics = evaluate_sequence({"world_points": from_depth}, points_gt, **caps)
    metrics["points_from_depth"] = {key: depth_metrics[key] for key in POINT_KEYS}
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=EMBEDDED_CHECKPOINT)
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--sequences", type=int, default=2)
    p.add_argument("--scenes", choices=tuple(SPLITS), default="held-out",
                   help="held-out (the scores the docs report) or validation (to choose between checkpoints)")
    p.add_argument("--trajectory", default="loop")
    p.add_argument("--height", type=int, default=84)
    p.add_argument("--width", type=int, default=112)
    p.add_argument("--stac-overrides", default="{}",
                   help="CacheConfig fields for stac (default: none - the reference confidence bar 2.0)")
    p.add_argument("--policies", default="full,window,sink_window,heavy_hitter,stac",
                   help="comma-separated policies to run (e.g. full alone, to compare checkpoints)")
    # Point-metric caps (defaults: the field's, as evaluate_sequence has them); a loaded CPU needs smaller ones.
    p.add_argument("--point-frame-stride", type=int, default=1, help="point metrics on every N-th frame")
    p.add_argument("--icp-iterations", type=int, default=30)
    p.add_argument("--max-points", type=int, default=20_000)
    p.add_argument("--max-reference-points", type=int, default=None)
    p.add_argument("--icp-max-points", type=int, default=10_000)
    p.add_argument("--icp-max-target-points", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="where the model runs (metrics run on the CPU)")
    p.add_argument("--benchmark", default="quality",
                   help="the name the result records (e.g. quality_validation for a checkpoint comparison)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model(checkpoint=args.checkpoint, device=args.device)
    results = {name: [] for name in configs(args)}
    baseline, example = [], None
    first_seed = SPLITS[args.scenes]
    for s in range(args.sequences):
        seq = to_first_camera_frame(make_sequence(args.frames, args.height, args.width, trajectory=args.trajectory,
                                                  seed=first_seed + s))
        med = torch.stack([d[v].median() if v.any() else d.new_tensor(1.0) for d, v in zip(seq.depth, seq.valid)])
        baseline.append(evaluate_sequence({"depth": med[:, None, None].expand_as(seq.depth)}, seq))
        for name, config in configs(args).items():
            pred, info = run(model, seq, config)
            metrics = score(pred, seq, args)
            conf = pred["world_points_conf"][seq.valid]
            info["point_conf_percentiles"] = {q: float(conf.quantile(q / 100)) for q in (10, 50, 90)} if conf.numel() else {}
            results[name].append({"seed": first_seed + s, **info, "metrics": metrics})
            print(f"seq {s} {name}: abs_rel {metrics['abs_rel']:.3f} acc {metrics['acc_mean']:.3f} comp {metrics['comp_mean']:.3f} "
                  f"ate {metrics['ate_rmse']:.3f} cache {info['peak_cache_bytes'] / 2**20:.1f} MiB {info['frames_per_second']:.1f} fps",
                  file=sys.stderr)
            if s == 0 and name == "stac":
                example = (pred, seq)
        write_report(args, results, baseline, done=s + 1)  # after every sequence: a long run keeps what it measured
    report = write_report(args, results, baseline, done=args.sequences)
    print(json.dumps(report["summary"], indent=1))
    plot(report, example, args.out.with_suffix(""))
    return 0


def write_report(args, results, baseline, done: int) -> dict:
    def mean(rows, key):
        values = [r["metrics"][key] if "metrics" in r else r[key] for r in rows]
        return float(np.mean(values))

    keys = ("abs_rel", "delta_1.25", "acc_mean", "comp_mean", "nc_mean", "ate_rmse", "rpe_trans", "rpe_rot_deg",
            "pose_auc_30", "pair_rot_deg", "pair_trans_deg")
    summary = {name: {k: mean(rows, k) for k in keys} | {"peak_cache_bytes": max(r["peak_cache_bytes"] for r in rows),
                                                          "frames_per_second": mean([{"x": r["frames_per_second"]} for r in rows], "x")}
               for name, rows in results.items()}
    for name, rows in results.items():
        prefixes = rows[0]["metrics"].get("ate_rmse_first_frames", {})
        summary[name]["ate_rmse_first_frames"] = {k: float(np.mean([r["metrics"]["ate_rmse_first_frames"][k] for r in rows]))
                                                  for k in prefixes}
    for name, rows in results.items():
        if all("points_from_depth" in r["metrics"] for r in rows):
            summary[name]["points_from_depth"] = {k: float(np.mean([r["metrics"]["points_from_depth"][k] for r in rows]))
                                                  for k in POINT_KEYS}
    summary["baseline_median_depth"] = {k: float(np.mean([b[k] for b in baseline])) for k in ("abs_rel", "delta_1.25")}
    report = {"benchmark": args.benchmark, "checkpoint": str(args.checkpoint.name), "device": args.device, "frames": args.frames,
              "sequences": done, "scenes": args.scenes, "stac_overrides": json.loads(args.stac_overrides or "{}"),
              "metric_settings": {k: getattr(args, k) for k in ("point_frame_stride", "icp_iterations", "max_points",
                                                                "max_reference_points", "icp_max_points", "icp_max_target_points")},
              "trajectory": args.trajectory, "image_hw": [args.height, args.width], "summary": summary, "runs": results}
    write_result(args.out, report, args.benchmark, args.device)
    return report


def plot(report, example, stem: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = [n for n in report["summary"] if n != "baseline_median_depth"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    mem = [report["summary"][n]["peak_cache_bytes"] / 2**20 for n in names]
    axes[0].bar(names, mem)
    axes[0].set(ylabel="MiB", title="peak cache per stream")
    axes[1].bar(names, [report["summary"][n]["abs_rel"] for n in names])
    axes[1].axhline(report["summary"]["baseline_median_depth"]["abs_rel"], color="k", ls="--", label="median-depth baseline")
    axes[1].set(title="depth Abs Rel (lower is better)")
    axes[1].legend()
    axes[2].bar(names, [report["summary"][n]["acc_mean"] for n in names], label="accuracy")
    axes[2].bar(names, [report["summary"][n]["comp_mean"] for n in names], alpha=0.5, label="completeness")
    axes[2].set(title="point cloud error (m, lower is better)")
    axes[2].legend()
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=110)
    plt.close(fig)
    if example is None:
        return
    pred, seq = example
    from_depth = unproject_depth(pred["depth"], pred["extrinsics"], pred["intrinsics"])
    panels = ((seq.world_points, "ground truth"), (pred["world_points"], "stac stream, point head"),
              (from_depth, "stac stream, depth + cameras"))
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    for ax, (points, title) in zip(axes, panels):
        pts = points[::3, ::3, ::3].reshape(-1, 3)
        colors = seq.images[::3, :, ::3, ::3].permute(0, 2, 3, 1).reshape(-1, 3).clamp(0, 1)
        keep = torch.isfinite(pts).all(-1) & (pts.abs().sum(-1) > 0)
        ax.scatter(pts[keep, 0], pts[keep, 2], s=0.3, c=colors[keep].numpy())
        centers = -(seq.extrinsics[:, :3, :3].transpose(-1, -2) @ seq.extrinsics[:, :3, 3:])[..., 0]
        ax.plot(centers[:, 0], centers[:, 2], "k-", lw=0.8)
        ax.set(title=f"{title}: top view (x-z)", aspect="equal")
    fig.tight_layout()
    fig.savefig(f"{stem}_reconstruction.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
