"""Quality against per-stream memory budget: for each bounded cache policy, reconstruction quality
at several budgets (fractions of the full cache's memory at the stream's length), on held-out
synthetic loops driven twice around the room, with the second lap (the revisits) scored apart.

    python benchmarks/quality_memory.py --out docs/benchmarks/quality_memory_MODEL_DEVICE.json   # defaults: 2 x 300 frames
    python benchmarks/quality_memory.py --threads 1 --lap-frames 150 --budgets 0.05,0.1,0.25,0.5 --sequences 1 \
        --point-frame-stride 4 --icp-iterations 10 --max-points 5000 --max-reference-points 50000 \
        --icp-max-points 2000 --icp-max-target-points 20000 --out docs/benchmarks/quality_memory_cpu.json   # CPU

How each policy spends a budget (the largest setting whose ``bytes_bound`` fits it; the camera
trunk's cache of 64 frames is counted in every bound):
- ``window`` / ``sink_window``: the most recent frames they can hold (at least one chunk);
- ``heavy_hitter``: the reference window of 4 frames and as many heavy-hitter frames as fit;
- ``stac``: the reference hot cache (window 4, hh 2, retrieval 2) with ``memory_budget_bytes`` =
  the budget, so its voxel pool gets the rest (``max_voxels`` unset); where that does not fit, hh
  then retrieval shrink (the first fitting of (4,2,2), (4,1,2), (4,0,2), (4,0,1)).
- ``stac:W/HH/R`` (only when asked for): ``stac`` with that window, hh and retrieval and the
  budget's rest in its pool, to compare ways of spending one budget (on validation scenes,
  ``--split validation``, so that no setting is chosen on the held-out ones);
- ``stac_no_retrieval`` (an ablation, only when asked for): ``stac``'s setting at that budget
  with ``retrieval=0``, so the same hot cache with nothing brought back from the pool;
- ``stac_true_geometry`` (an ablation, only when asked for): ``stac``'s setting at that budget,
  its cache placing tokens in voxels and finding the ones near the camera by the ground-truth
  points of each frame instead of the point head's (everything the model outputs is its own), so
  what the spatial memory brings when its geometry is right.
A budget too small for a policy's smallest setting is reported as not fitting. The full cache is
run once as the reference. Scenes are held out (seeds from 1,000,000); no setting is tuned on them
(``--split validation``, seeds from 2,000,000, is where settings are compared).

Metrics (``stac_backend.evaluation.scoring``): accuracy / completeness / NC after Sim(3) + ICP,
depth Abs Rel after median scaling, ATE; the revisit lap is scored under the whole stream's
alignment, so drift away from the first lap's map counts against it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import torch

from stac_backend.assets import EMBEDDED_CHECKPOINT
from stac_backend.cache import CacheConfig, CameraCache, make_cache
from stac_backend.data import SPLITS
from stac_backend.engine import full_cache_bytes_per_frame
from stac_backend.engine.stream import cache_geometry
from stac_backend.evaluation.report import provenance
from stac_backend.evaluation.runner import stream_sequence
from stac_backend.evaluation.scoring import MetricSettings, score_prediction
from stac_backend.evaluation.synthetic import lap_segments, revisit_loop
from stac_backend.model import build_model
from stac_backend.results import run_record

BOUNDED = ("window", "sink_window", "heavy_hitter", "stac")
# An ablation, not a policy (--policies stac_no_retrieval): stac with the same window, hh and budget
# but nothing retrieved from its pool, i.e. its hot cache alone. Against stac at the same budget it
# shows what the retrieved pivots add or cost.
ABLATION = "stac_no_retrieval"
# The other ablation (--policies stac_true_geometry): stac whose cache takes the ground-truth points
# in place of the point head's. Against stac it separates the spatial memory from the model's
# geometry: a model whose points are off pools tokens in the wrong voxels and retrieves the wrong ones.
TRUE_GEOMETRY = "stac_true_geometry"
ABLATIONS = (ABLATION, TRUE_GEOMETRY)
STAC_HOT_SETTINGS = ((4, 2, 2), (4, 1, 2), (4, 0, 2), (4, 0, 1))  # (window, hh, retrieval), preferred first
# "overall" is the mean of accuracy and completeness (DTU's overall, a Chamfer distance): the two
# trade against each other through the Sim(3) scale that aligns a cloud, their mean much less.
SHOWN = (("comp_mean", "comp (m)"), ("acc_mean", "acc (m)"), ("overall", "overall (m)"), ("ate_rmse", "ATE (m)"),
         ("abs_rel", "Abs Rel"))
# The points unprojected from predicted depth and cameras (score_prediction's second point score),
# tabled for the whole stream where every run has them (files from before it was scored lack them).
SHOWN_FROM_DEPTH = (("depth_points_comp_mean", "comp, depth + cameras (m)"),
                    ("depth_points_acc_mean", "acc, depth + cameras (m)"))


def bound_of(config: CacheConfig, model, tokens_per_frame: int) -> int | None:
    """The stream's byte bound for this config - the policy's and the camera trunk's cache, as the
    full cache's bytes (the budgets' unit) count both - or None when the config cannot fit its own
    budget."""
    geometry = cache_geometry(model)
    try:
        policy = make_cache(config, geometry).bytes_bound(tokens_per_frame)
    except ValueError:
        return None
    return None if policy is None else policy + CameraCache(config, geometry).bytes_bound()


def config_for_budget(policy: str, budget: int, model, tokens_per_frame: int, chunk: int, frames: int,
                      stac_overrides: dict) -> CacheConfig | None:
    """The largest setting of ``policy`` whose bound fits ``budget`` bytes (None if none fits)."""
    def fits(config: CacheConfig) -> bool:
        bound = bound_of(config, model, tokens_per_frame)
        return bound is not None and bound <= budget

    def largest(make, low: int, high: int) -> CacheConfig | None:
        """Largest n in [low, high] with make(n) fitting (bounds grow with n)."""
        if not fits(make(low)):
            return None
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(make(mid)) else (low, mid - 1)
        return make(low)

    if policy in ("window", "sink_window"):
        return largest(lambda n: CacheConfig(policy=policy, chunk=chunk, window=n), chunk, frames)
    if policy == "heavy_hitter":
        window = max(chunk, 4)
        return largest(lambda n: CacheConfig(policy=policy, chunk=chunk, window=window, hh=n), 0, frames)
    if policy.startswith("stac:"):  # a chosen hot cache "stac:WINDOW/HH/RETRIEVAL", the pool gets the rest
        window, hh, retrieval = (int(x) for x in policy[len("stac:"):].split("/"))
        config = CacheConfig(policy="stac", chunk=chunk, window=max(window, chunk), hh=hh, retrieval=retrieval,
                             max_voxels=None, memory_budget_bytes=budget, **stac_overrides)
        return config if fits(config) else None
    if policy == TRUE_GEOMETRY:  # stac's setting at this budget; the geometry is swapped in while streaming
        return config_for_budget("stac", budget, model, tokens_per_frame, chunk, frames, stac_overrides)
    if policy == ABLATION:  # stac's setting at this budget, its spatial memory never read
        config = config_for_budget("stac", budget, model, tokens_per_frame, chunk, frames, stac_overrides)
        return None if config is None else config.replace(retrieval=0)
    if policy == "stac":
        for window, hh, retrieval in STAC_HOT_SETTINGS:
            config = CacheConfig(policy="stac", chunk=chunk, window=max(window, chunk), hh=hh, retrieval=retrieval,
                                 max_voxels=None, memory_budget_bytes=budget, **stac_overrides)
            if fits(config):
                return config
        return None
    raise ValueError(f"not a bounded policy: {policy}")


def use_true_geometry(seq):
    """A ``stream_sequence`` hook: the stream's stac cache ends each step with the ground-truth
    points of the step's frames (NaN where the ground truth has none) in place of the point head's,
    at a confidence above any bar. The model's outputs are untouched; only where the cache pools
    and retrieves tokens changes. Ground truth and predictions share camera 0's frame in metres."""
    points = seq.world_points.float()
    truth = torch.where(seq.valid[..., None], points, torch.full_like(points, float("nan")))

    def prepare(stream) -> None:
        cache = stream.cache
        end_step = cache.end_step

        def end_step_with_true_points(info):
            frames = slice(info.frame_offset, info.frame_offset + info.num_frames)
            points = truth[frames].to(info.world_points.device)[None]
            confident = torch.full(points.shape[:-1], 1e6, device=points.device)
            return end_step(dataclasses.replace(info, world_points=points, world_points_conf=confident))

        cache.end_step = end_step_with_true_points

    return prepare


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=EMBEDDED_CHECKPOINT)
    p.add_argument("--lap-frames", type=int, default=300, help="frames per lap (the stream has laps x this)")
    p.add_argument("--laps", type=int, default=2)
    p.add_argument("--sequences", type=int, default=2, help="scenes of the split (held-out: seeds 1,000,000 on)")
    p.add_argument("--first-scene", type=int, default=0, help="start at this scene of the split (to split a run)")
    p.add_argument("--split", choices=sorted(SPLITS), default="held-out",
                   help="the scenes' seeds: held-out (reported) or validation (for choosing settings)")
    p.add_argument("--height", type=int, default=84)
    p.add_argument("--width", type=int, default=112)
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--budgets", default="0.02,0.05,0.1,0.25,0.5", help="fractions of the full cache at the stream's length")
    p.add_argument("--policies", default=",".join(BOUNDED))
    p.add_argument("--stac-overrides", default="{}", help="CacheConfig fields for stac, e.g. a confidence bar")
    p.add_argument("--point-frame-stride", type=int, default=1, help="point metrics on every N-th frame")
    p.add_argument("--icp-iterations", type=int, default=30)
    p.add_argument("--max-points", type=int, default=20_000)
    p.add_argument("--icp-max-points", type=int, default=10_000)
    p.add_argument("--icp-max-target-points", type=int, default=100_000)
    p.add_argument("--max-reference-points", type=int, default=None,
                   help="cap on the reference cloud of acc/comp (default: all points)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="where the model runs (metrics run on the CPU)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--skip-full", action="store_true", help="do not run the full-cache reference (e.g. a run split by policy)")
    p.add_argument("--replot", action="store_true", help="only redraw the table and plot of an existing --out JSON")
    p.add_argument("--merge", type=Path, nargs="*", default=[],
                   help="with --replot: add the runs of these JSON files (other policies or scenes, same settings) to --out")
    args = p.parse_args()
    if args.replot:
        report = json.loads(args.out.read_text())
        for other in args.merge:
            extra = {seq["seed"]: seq["runs"] for seq in json.loads(other.read_text())["sequences"]}
            for seq in report["sequences"]:
                seq["runs"] += extra.pop(seq["seed"], [])
            report["sequences"] += [{"seed": seed, "runs": runs} for seed, runs in extra.items()]
            report.setdefault("merged_from", []).append(other.name)
        report["summary"] = summarize(report)
        report["table_markdown"] = table(report)
        args.out.write_text(json.dumps(report, indent=1, default=float))
        print(report["table_markdown"])
        plot(report, args.out.with_suffix(".png"))
        return 0
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = build_model(checkpoint=args.checkpoint, device=args.device)
    stac_overrides = json.loads(args.stac_overrides)
    fractions = [float(f) for f in args.budgets.split(",")]
    policies = [n.strip() for n in args.policies.split(",") if n.strip()]
    unknown = [n for n in policies if n not in BOUNDED + ABLATIONS and not re.fullmatch(r"stac:\d+/\d+/\d+", n)]
    if unknown:
        p.error(f"unknown policies {unknown}: choose from {', '.join(BOUNDED + ABLATIONS)} or stac:WINDOW/HH/RETRIEVAL")
    frames = args.lap_frames * args.laps
    tokens = model.config.tokens_per_frame(args.height, args.width)
    dtype = next(model.parameters()).dtype
    full_bytes = full_cache_bytes_per_frame(model.config, args.height, args.width, dtype) * frames
    settings = MetricSettings(icp_iterations=args.icp_iterations, max_points=args.max_points,
                              icp_max_points=args.icp_max_points, icp_max_target_points=args.icp_max_target_points,
                              max_reference_points=args.max_reference_points,
                              point_frame_stride=args.point_frame_stride)
    segments = lap_segments(args.lap_frames, args.laps)
    # validation runs choose settings and are kept apart from the reported held-out ones
    benchmark = "quality_memory" if args.split == "held-out" else f"quality_memory_{args.split}"
    report = {"run": run_record(benchmark, args.device), "provenance": provenance(args.device), "checkpoint": args.checkpoint.name,
              "split": args.split, "frames": frames, "laps": args.laps, "lap_frames": args.lap_frames, "image_hw": [args.height, args.width],
              "chunk": args.chunk, "tokens_per_frame": tokens, "full_cache_bytes_at_length": full_bytes,
              "budget_fractions": fractions, "stac_overrides": stac_overrides, "metric_settings": settings.to_dict(),
              "revisit_segments": segments, "sequences": []}
    for s in range(args.first_scene, args.first_scene + args.sequences):
        seed = SPLITS[args.split] + s
        seq = revisit_loop(args.lap_frames, args.laps, args.height, args.width, seed=seed)
        gt = {"depth": seq.depth, "valid": seq.valid, "world_points": seq.world_points, "extrinsics": seq.extrinsics}
        runs = []
        plan = [] if args.skip_full else [("full", None, CacheConfig(policy="full", chunk=args.chunk))]
        for policy in policies:
            for fraction in fractions:
                config = config_for_budget(policy, int(fraction * full_bytes), model, tokens, args.chunk, frames,
                                           stac_overrides)
                plan.append((policy, fraction, config))
        for policy, fraction, config in plan:
            row = {"policy": policy, "budget_fraction": fraction,
                   "budget_bytes": None if fraction is None else int(fraction * full_bytes)}
            if config is None:
                runs.append(row | {"fits": False})
                print(f"seed {seed} {policy} @ {fraction:.0%}: smallest setting does not fit", file=sys.stderr)
                continue
            prepare = use_true_geometry(seq) if policy == TRUE_GEOMETRY else None
            pred, info = stream_sequence(model, seq.images, config, prepare=prepare)
            metrics = score_prediction(pred, gt, settings, segments)
            # by the policy the config runs (stac for the ablation and the chosen hot caches too)
            relevant = {"full": (), "window": ("window",), "sink_window": ("window",), "heavy_hitter": ("window", "hh"),
                        "stac": ("window", "hh", "retrieval")}[config.policy]
            settings_used = {k: getattr(config, k) for k in relevant}
            if config.policy == "stac" and config.retrieval:  # a pool that is read
                settings_used["pool_voxels"] = make_cache(config, cache_geometry(model)).pool_voxels(tokens)
            runs.append(row | {"fits": True, "settings": settings_used, **info, "metrics": metrics})
            m = metrics["all"]
            label = "full" if fraction is None else f"{policy} @ {fraction:.0%}"
            print(f"seed {seed} {label}: comp {m['comp_mean']:.3f} acc {m['acc_mean']:.3f} ate {m['ate_rmse']:.3f} "
                  f"(lap 2 comp {metrics['lap_2']['comp_mean']:.3f}) bound "
                  f"{(info['cache_bytes_bound'] or info['peak_cache_bytes']) / 2**20:.2f} MiB peak "
                  f"{info['peak_cache_bytes'] / 2**20:.2f} MiB, {info['frames_per_second']:.1f} frames/s", file=sys.stderr)
            report["sequences"] = [x for x in report["sequences"] if x["seed"] != seed] + [{"seed": seed, "runs": runs}]
            write(report, args.out, started)
    write(report, args.out, started)
    print(report["table_markdown"])
    plot(report, args.out.with_suffix(".png"))
    return 0


def summarize(report: dict) -> dict:
    """Mean over sequences per (policy, budget) and segment."""
    groups: dict[tuple, list] = {}
    for seq in report["sequences"]:
        for run in seq["runs"]:
            groups.setdefault((run["policy"], run["budget_fraction"]), []).append(run)
    summary = []
    for (policy, fraction), runs in groups.items():
        entry = {"policy": policy, "budget_fraction": fraction, "fits": all(r["fits"] for r in runs)}
        if entry["fits"]:
            entry["settings"] = runs[0]["settings"]
            entry["bound_bytes"] = max(r["cache_bytes_bound"] or r["peak_cache_bytes"] for r in runs)
            entry["peak_bytes"] = max(r["peak_cache_bytes"] for r in runs)
            scores = [{seg: with_overall(m) for seg, m in r["metrics"].items()} for r in runs]
            entry["metrics"] = {seg: {k: sum(s[seg][k] for s in scores) / len(scores) for k in scores[0][seg]}
                                for seg in scores[0]}
        summary.append(entry)
    return {"rows": summary, "scenes": compare_scenes(report)}


def compare_scenes(report: dict) -> dict:
    """What the means hide: per (policy, budget), each scene's change against its own full cache
    (relative, on accuracy, completeness, overall and ATE) and how many scenes are within 5% of it
    on accuracy, completeness and ATE; per budget, how many scenes each bounded policy has the best
    revisit-lap overall and ATE on."""
    changes: dict[str, dict] = {}
    best: dict[str, dict] = {}
    keys = ("acc_mean", "comp_mean", "overall", "ate_rmse")
    for seq in report["sequences"]:
        runs = {(r["policy"], r["budget_fraction"]): r for r in seq["runs"] if r.get("fits")}
        if ("full", None) not in runs:
            continue
        full = with_overall(runs[("full", None)]["metrics"]["all"])
        for (policy, fraction), run in runs.items():
            if policy == "full":
                continue
            m = with_overall(run["metrics"]["all"])
            entry = changes.setdefault(f"{policy} @ {fraction:g}", {k: [] for k in keys} | {"within_5pct": 0, "scenes": 0})
            relative = {k: m[k] / full[k] - 1 for k in keys}
            for k in keys:
                entry[k].append(relative[k])
            entry["scenes"] += 1
            entry["within_5pct"] += all(relative[k] <= 0.05 for k in ("acc_mean", "comp_mean", "ate_rmse"))
        for fraction in {f for (p, f) in runs if p in BOUNDED and f is not None}:
            lap = {p: with_overall(runs[(p, fraction)]["metrics"]["lap_2"]) for p in BOUNDED if (p, fraction) in runs}
            counts = best.setdefault(f"{fraction:g}", {"overall": {}, "ate_rmse": {}})
            for k in counts:
                winner = min(lap, key=lambda p: lap[p][k])
                counts[k][winner] = counts[k].get(winner, 0) + 1
    ranges = {name: {k: [min(v[k]), max(v[k])] for k in keys} | {"within_5pct": v["within_5pct"], "scenes": v["scenes"]}
              for name, v in changes.items()}
    return {"change_against_full": ranges, "best_on_revisit_lap": dict(sorted(best.items(), key=lambda kv: float(kv[0])))}


def with_overall(metrics: dict) -> dict:
    """One segment's scores plus ``overall``, the mean of accuracy and completeness (and the same
    of the points from depth + cameras where they were scored)."""
    added = {"overall": 0.5 * (metrics["acc_mean"] + metrics["comp_mean"])}
    if "depth_points_acc_mean" in metrics:
        added["depth_points_overall"] = 0.5 * (metrics["depth_points_acc_mean"] + metrics["depth_points_comp_mean"])
    return metrics | added


def table(report: dict) -> str:
    full = report["full_cache_bytes_at_length"]
    head = ["policy", "budget", "settings (window / hh / retrieval / pool voxels)", "bound MiB (% of full)", "peak MiB"]
    fitting = [row for row in report["summary"]["rows"] if row["fits"]]
    from_depth = [item for item in SHOWN_FROM_DEPTH if fitting and all(item[0] in row["metrics"]["all"] for row in fitting)]
    head += [f"{title}" for _, title in SHOWN] + [f"lap 2 {title}" for key, title in SHOWN if key != "abs_rel"]
    head += [title for _, title in from_depth]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in report["summary"]["rows"]:
        budget = "-" if row["budget_fraction"] is None else f"{row['budget_fraction']:.0%}"
        if not row["fits"]:
            lines.append(f"| {row['policy']} | {budget} | does not fit |" + " - |" * (len(head) - 3))
            continue
        s = row["settings"]
        described = " / ".join(str(s[k]) for k in ("window", "hh", "retrieval", "pool_voxels") if k in s) or "every frame"
        cells = [row["policy"], budget, described, f"{row['bound_bytes'] / 2**20:.2f} ({100 * row['bound_bytes'] / full:.1f}%)",
                 f"{row['peak_bytes'] / 2**20:.2f}"]
        cells += [f"{row['metrics']['all'][k]:.3f}" for k, _ in SHOWN]
        cells += [f"{row['metrics']['lap_2'][k]:.3f}" for k, _ in SHOWN if k != "abs_rel"]
        cells += [f"{row['metrics']['all'][k]:.3f}" for k, _ in from_depth]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(report: dict, out: Path, started: float) -> None:
    report["summary"] = summarize(report)
    report["table_markdown"] = table(report)
    report["seconds"] = round(time.perf_counter() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=float))


def plot(report: dict, path: Path) -> None:
    """One figure: each metric (whole stream and revisit lap) against the budget, one line per policy."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    rows = [r for r in report["summary"]["rows"] if r["fits"]]
    full = next((r for r in rows if r["policy"] == "full"), None)
    panels = [("all", k, t) for k, t in SHOWN] + [("lap_2", k, t) for k, t in SHOWN if k != "abs_rel"]
    fig, axes = plt.subplots(2, 5, figsize=(18, 6.5))
    for ax, (segment, key, title) in zip(axes.flat, panels):
        for policy in dict.fromkeys(r["policy"] for r in rows if r["policy"] != "full"):
            points = sorted((100 * r["bound_bytes"] / report["full_cache_bytes_at_length"], r["metrics"][segment][key])
                            for r in rows if r["policy"] == policy)
            ax.plot(*zip(*points), marker="o", label=policy)
        if full is not None:
            ax.axhline(full["metrics"][segment][key], color="k", ls="--", lw=1, label="full (100%)")
        ax.set_xscale("log")
        ticks = [100 * f for f in report["budget_fractions"]]
        ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set(xlabel="cache bound, % of full at the stream's length",
               title=f"{title}, {'second lap (revisits)' if segment != 'all' else 'whole stream'}")
        ax.title.set_fontsize(9)
    axes.flat[-1].axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    axes.flat[-1].legend(handles, labels, loc="center")
    fig.suptitle(f"quality vs memory: {report['laps']} laps x {report['lap_frames']} frames at "
                 f"{report['image_hw'][1]}x{report['image_hw'][0]}, {len(report['sequences'])} {report.get('split', 'held-out')} scene(s), "
                 f"{report['checkpoint']} (lower is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
