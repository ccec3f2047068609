"""Write docs/quality.md from the quality benchmark's JSON (and the training history's, the previous
checkpoint's and the validation comparison's JSON).

    python benchmarks/quality_doc.py                                   # docs/benchmarks/quality_cpu.json
    python benchmarks/quality_doc.py --source docs/benchmarks/quality_cpu.json --out docs/quality.md

Every number in the page comes from those files; the prose around them only says what they mean.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("full", "window", "sink_window", "heavy_hitter", "stac")


def training_summary(path: Path) -> str:
    if not path.is_file():
        return "trained on synthetic rooms"
    runs = json.loads(path.read_text())["runs"]
    # A run resumed from weights alone restarts its step counter; resumed_from_step says where it picked up.
    steps = runs[-1].get("resumed_from_step", 0) + runs[-1]["history"][-1]["step"]
    minutes = sum(float(r["seconds"]) / 60 if "seconds" in r else float(r["args"]["minutes"]) for r in runs)
    # Runs without their own device field ran on the file's device.
    default = json.loads(path.read_text()).get("device", "NVIDIA H100 80GB HBM3")
    gpus = sorted({short_gpu_name(r.get("device", default)) for r in runs})
    return (f"trained for ~{steps:,} steps in {len(runs)} runs, each resuming the last (~{minutes:.0f} min on one "
            f"{' or one '.join(gpus)}, `{path.relative_to(ROOT)}`)")


def short_gpu_name(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100'."""
    for word in name.split():
        if word[:1] in "ABHL" and word[1:].isdigit():
            return word
    return name


def span(values: list[float], digits: int) -> str:
    """'lo-hi', or one number where they print the same."""
    lo, hi = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return lo if lo == hi else f"{lo}-{hi}"


def metric_caps(report: dict) -> list[str]:
    caps = report.get("metric_settings")
    if not caps:
        return []
    return ["Point metrics with CPU-sized caps (`metric_settings` in the JSON): every "
            f"{caps['point_frame_stride']}th frame, {caps['icp_iterations']} ICP iterations on {caps['icp_max_points']:,} / "
            f"{caps['icp_max_target_points']:,} points, {caps['max_points']:,} query points (the field's defaults: every "
            "frame, 30 iterations, 10,000 / 100,000 and 20,000)."]


def policy_spread(s: dict, training: Path) -> str:
    """What the policies' completeness and accuracy say about how the model uses its memory."""
    keepers = ("sink_window", "heavy_hitter", "stac")  # bounded policies that keep frame 0
    comp = [s[n]["comp_mean"] for n in keepers]
    acc = [s[n]["acc_mean"] for n in keepers]
    full = s["full"]
    frames = "?"
    if training.is_file():
        frames = max(int(r["args"]["frames"]) for r in json.loads(training.read_text())["runs"])
    than = "better than" if max(comp) < full["comp_mean"] else "worse than" if min(comp) > full["comp_mean"] else "around"
    window = s["window"]["comp_mean"]
    others = [s[n]["comp_mean"] for n in POLICIES if n != "window" and n in s]
    rank = ("completes worst" if window > max(others) else "completes best" if window < min(others)
            else "completes within their range")
    bounded_ate = [s[n]["ate_rmse"] for n in POLICIES if n != "full" and n in s]
    poses = (f"The full cache keeps the best poses (ATE {full['ate_rmse']:.2f} m against {min(bounded_ate):.2f}-"
             f"{max(bounded_ate):.2f} m for the bounded policies)" if full["ate_rmse"] < min(bounded_ate) else
             f"The full cache's poses (ATE {full['ate_rmse']:.2f} m) are no better than every bounded policy's "
             f"({min(bounded_ate):.2f}-{max(bounded_ate):.2f} m)")
    return (f"- The bounded policies that keep frame 0 (sink_window, heavy_hitter, stac) reach completeness "
            f"{min(comp):.3f}-{max(comp):.3f} m, {than} the full cache's "
            f"{full['comp_mean']:.3f} m, at accuracy {min(acc):.3f}-{max(acc):.3f} m against {full['acc_mean']:.3f} m; "
            f"`window`, which drops frame 0 (the world frame), {rank} ({window:.3f} m). {poses}; the model was "
            f"trained on windows of at most {frames} frames, so a cache longer than that is outside what it has seen.")


def training_conf_alpha(path: Path) -> str:
    if not path.is_file():
        return "?"
    return json.loads(path.read_text())["runs"][-1]["args"].get("conf_alpha", "0.2")


def points_two_ways(s: dict) -> list[str]:
    """The point metrics from the point head against those from depth unprojected with the predicted
    cameras (``points_from_depth``), per policy."""
    names = [n for n in POLICIES if n in s and "points_from_depth" in s[n]]
    if not names:
        return []
    lines = ["", "The same predictions' points two ways: the point head's world points (the table above) and the "
                 "predicted depth unprojected with the predicted cameras (`points_from_depth`), same alignment "
                 "and caps:", "",
             "| policy | acc (m), head | acc (m), depth + cameras | comp (m), head | comp (m), depth + cameras "
             "| NC, head | NC, depth + cameras |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for n in names:
        head, depth = s[n], s[n]["points_from_depth"]
        lines.append(f"| {n} | {head['acc_mean']:.3f} | {depth['acc_mean']:.3f} | {head['comp_mean']:.3f} | "
                     f"{depth['comp_mean']:.3f} | {head['nc_mean']:.3f} | {depth['nc_mean']:.3f} |")
    full, depth = s["full"], s["full"].get("points_from_depth")
    if depth:
        better = [label for key, label in (("acc_mean", "accuracy"), ("comp_mean", "completeness"))
                  if depth[key] < full[key]] + (["NC"] if depth["nc_mean"] > full["nc_mean"] else [])
        verdict = (": the depth and camera heads are the model's better route to a map, as VGGT reports for its "
                   "own heads" if {"accuracy", "completeness"} <= set(better) else "")
        lines += ["", f"With the full cache, depth + cameras is better on {', '.join(better) or 'nothing'} "
                      f"(accuracy {full['acc_mean']:.3f} -> {depth['acc_mean']:.3f} m, completeness "
                      f"{full['comp_mean']:.3f} -> {depth['comp_mean']:.3f} m){verdict}."]
    return lines


def validation_comparison(merged: dict, name: str) -> list[str]:
    """The checkpoints compared on the validation scenes (``quality.py --scenes validation``, one
    labelled run per checkpoint, merged): where the embedded checkpoint was chosen."""
    keys = ("abs_rel", "acc_mean", "comp_mean", "nc_mean", "ate_rmse", "align_scale")
    rows, seeds = [], set()
    for run in merged.get("runs", []):
        per_seed = run["runs"]["full"]
        seeds |= {r["seed"] for r in per_seed}
        means = {k: sum(r["metrics"][k] for r in per_seed) / len(per_seed) for k in keys if all(k in r["metrics"] for r in per_seed)}
        rows.append((run["label"], run.get("checkpoint", "?"), means))
    if not rows:
        return []
    lines = ["", f"The checkpoint was chosen on validation scenes (`{name}`, seeds {min(seeds):,} to {max(seeds):,}, "
                 "which no training pool renders), not on the held-out ones above; policy `full`, means:", "",
             "| checkpoint | depth Abs Rel | acc (m) | comp (m) | NC | ATE (m) | Sim(3) scale |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, checkpoint, m in rows:
        lines.append(f"| {label} ({checkpoint}) | " + " | ".join(f"{m[k]:.3f}" if k in m else "-" for k in keys) + " |")
    return lines


def previous_comparison(report: dict, previous: dict, previous_name: str) -> list[str]:
    """The same held-out seeds through both checkpoints (policy ``full``, means over the seeds both
    ran): what the latest training changed, and how far into the loop the poses hold."""
    keys = ("abs_rel", "acc_mean", "comp_mean", "nc_mean", "ate_rmse", "rpe_trans", "rpe_rot_deg")
    new_runs = {r["seed"]: r["metrics"] for r in report["runs"]["full"]}
    old_runs = {r["seed"]: r["metrics"] for r in previous["runs"]["full"]}
    seeds = sorted(set(new_runs) & set(old_runs))
    if not seeds:
        return []

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    def first_frames(runs: dict, prefix: str) -> float:
        return mean([runs[s]["ate_rmse_first_frames"][prefix] for s in seeds])

    new = {k: mean([new_runs[s][k] for s in seeds]) for k in keys}
    old = {k: mean([old_runs[s][k] for s in seeds]) for k in keys}
    lines = [
        "",
        f"Against the previous checkpoint (`{previous_name}`, {previous.get('checkpoint', '?')}), same held-out "
        f"seed(s) {', '.join(map(str, seeds))}, policy `full`, means:",
        "",
        "| checkpoint | depth Abs Rel | acc (m) | comp (m) | NC | ATE (m) | RPE trans (m) | RPE rot (deg) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, m in (("previous", old), ("this one", new)):
        lines.append(f"| {label} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |")
    names = {"abs_rel": "depth Abs Rel", "acc_mean": "accuracy", "comp_mean": "completeness", "nc_mean": "NC",
             "ate_rmse": "ATE", "rpe_trans": "RPE trans", "rpe_rot_deg": "RPE rot"}
    # Within 1% of each other counts as unchanged.
    same = [names[k] for k in keys if abs(new[k] - old[k]) <= 0.01 * abs(old[k])]
    better = [names[k] for k in keys if (new[k] > old[k]) == (k == "nc_mean") and names[k] not in same]
    worse = [names[k] for k in keys if names[k] not in better and names[k] not in same]
    lines += ["", f"Better now: {', '.join(better) or 'none'}; worse: {', '.join(worse) or 'none'}"
                  f"{'; unchanged (within 1%): ' + ', '.join(same) if same else ''}."]
    if all("align_scale" in runs[s] for runs in (new_runs, old_runs) for s in seeds):
        # A least-squares Sim(3) shrinks a cloud that agrees poorly with the ground truth point for point.
        scale_old, scale_new = (mean([runs[s]["align_scale"] for s in seeds]) for runs in (old_runs, new_runs))
        lines += ["", f"The Sim(3) scale that aligns the predicted points to the ground truth (`align_scale`): "
                      f"previous {scale_old:.2f}, this one {scale_new:.2f}. The alignment is a least-squares fit, "
                      "so the less the predicted points agree with the ground truth point for point, the more it "
                      "shrinks them: a scale well below 1 pulls the cloud onto part of the scene, which helps "
                      "accuracy and hurts completeness."]
    prefixes = [p for p in new_runs[seeds[0]].get("ate_rmse_first_frames", {})
                if all(p in runs[s].get("ate_rmse_first_frames", {}) for runs in (new_runs, old_runs) for s in seeds)]
    if prefixes:
        frames = report["frames"]
        lines += [
            "",
            "How far into a stream the poses hold: ATE (m) over the loop's first N frames, each prefix "
            "aligned on its own (`ate_rmse_first_frames`; same seeds, policy `full`):",
            "",
            "| checkpoint | " + " | ".join(f"first {p}" for p in prefixes) + f" | all {frames} |",
            "| --- | " + " | ".join("---" for _ in prefixes) + " | --- |",
        ]
        for label, runs, m in (("previous", old_runs, old), ("this one", new_runs, new)):
            lines.append(f"| {label} | " + " | ".join(f"{first_frames(runs, p):.3f}" for p in prefixes)
                         + f" | {m['ate_rmse']:.3f} |")
        first = prefixes[0]
        lines += ["", f"With this checkpoint the poses are {first_frames(new_runs, first):.2f} m off over the first {first} "
                      f"frames and {new['ate_rmse']:.2f} m over all {frames}: the error grows with the stream's length."]
    return lines


def render(report: dict, source: Path, training: Path, previous: Path | None = None,
           validation: Path | None = None) -> str:
    s = report["summary"]
    h, w = report["image_hw"]
    stac_runs = report["runs"]["stac"]
    pool = stac_runs[0]["cache_stats"]
    conf = stac_runs[0].get("point_conf_percentiles", {})
    bar = report.get("stac_overrides", {}).get("conf_threshold", 2.0)
    pairs = has_pairs(s)  # runs from before the pair metrics have no such columns
    lines = [
        "# Quality of the embedded model and of each cache policy",
        "",
        f"Generated by `benchmarks/quality_doc.py` from `{source.relative_to(ROOT)}` (`python benchmarks/quality.py "
        f"--frames {report['frames']} --sequences {report['sequences']} ...`, model on {report.get('device', 'cpu')}). "
        f"Model: the embedded `small` checkpoint (`stac_backend/assets/small.safetensors`, 6.3 M parameters) "
        f"{training_summary(training)}. Test scenes are held out (seeds 1,000,000 to 1,009,999, which no training pool renders), "
        f"{report['frames']}-frame **{report['trajectory']}** trajectories at {w}x{h}, so the camera comes back to "
        f"where it started; {report['sequences']} sequence(s), means over them.",
        "",
        "| policy | peak cache MiB | depth Abs Rel | delta<1.25 | acc (m) | comp (m) | NC | ATE (m) | RPE rot (deg) |"
        + (" pair rot (deg) | AUC@30 |" if pairs else ""),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- | --- |" if pairs else ""),
    ]
    for name in POLICIES:
        r = s[name]
        lines.append(f"| {name} | {r['peak_cache_bytes'] / 2**20:.1f} | {r['abs_rel']:.3f} | {r['delta_1.25']:.3f} | "
                     f"{r['acc_mean']:.3f} | {r['comp_mean']:.3f} | {r['nc_mean']:.3f} | {r['ate_rmse']:.2f} | {r['rpe_rot_deg']:.1f} |"
                     + (f" {r['pair_rot_deg']:.1f} | {r['pose_auc_30']:.3f} |" if pairs else ""))
    b = s["baseline_median_depth"]
    lines += [
        f"| per-frame median depth (baseline) | - | {b['abs_rel']:.3f} | {b['delta_1.25']:.3f} | - | - | - | - | - |"
        + (" - | - |" if pairs else ""),
        "",
        "Metrics as the field computes them (`stac_backend.metrics`): acc/comp = mean nearest-neighbour",
        "distance after Umeyama Sim(3) + ICP (threshold 0.1), depth after per-sequence median scaling",
        "(capped at 70 m), ATE/RPE after Sim(3)"
        + (("; over every pair of frames, with no alignment (VGGT's camera protocol), the median error of "
            "the relative rotation (pair rot) and the AUC of the larger of the rotation and translation-direction "
            "errors for thresholds of 1 to 30 degrees (AUC@30, in [0, 1]).") if pairs else "."),
        *metric_caps(report),
        "",
        "What this says:",
        f"- Depth is learned: Abs Rel {span([s[n]['abs_rel'] for n in POLICIES], 3)} "
        f"against {b['abs_rel']:.3f} for the per-frame median-depth baseline.",
        f"- Poses and global point clouds are still rough (ATE {span([s[n]['ate_rmse'] for n in POLICIES], 2)} m in rooms "
        "of a few metres).",
        *pair_errors_line(s),
        policy_spread(s, training),
    ]
    if conf and conf["50"] < 1.05:
        lines.append(
            f"- Point confidences (valid pixels, `stac` run): p10 / p50 / p90 = {conf['10']:.4f} / {conf['50']:.4f} / "
            f"{conf['90']:.4f}. They sit at the floor of the `1 + exp` activation: the point errors relative to the "
            "scene scale are above the log-confidence regulariser's scale, so the loss drives them to 1."
        )
    elif conf:
        lines.append(
            f"- Point confidences (valid pixels, `stac` run): p10 / p50 / p90 = {conf['10']:.2f} / {conf['50']:.2f} / "
            f"{conf['90']:.2f}: they carry information (the confidence regulariser's weight alpha is "
            f"{training_conf_alpha(training)}), so `stac`'s voxel pool receives the points above its bar."
        )
    overridden = "conf_threshold" in report.get("stac_overrides", {})
    how = f"with a confidence bar of {bar:g} (`--stac-overrides`)" if overridden else f"at its reference confidence bar ({bar:g})"
    lines.append(
        f"- `stac` ran {how}: on the first sequence it pooled "
        f"{pool.get('pooled_tokens', 0):,} tokens into at most {pool.get('pool_max_voxels', pool.get('pool_voxels', 0))} "
        f"voxels, evicting {pool.get('pool_evicted_voxels', 0):,} voxels on the way and creating "
        f"{pool.get('pool_pivots_created', 0)} pivots; at the end it held {pool.get('pool_pivots', 0)} pivots and retrieved "
        f"{pool.get('retrieved_per_head', 0)} per head. Its peak cache, "
        f"{s['stac']['peak_cache_bytes'] / 2**20:.1f} MiB ({s['stac']['peak_cache_bytes'] / s['full']['peak_cache_bytes']:.0%} "
        f"of the full cache's at this length), is mostly the preallocated voxel pool "
        f"({pool.get('pool_memory_bytes', 0) / 2**20:.1f} MiB)."
    )
    same = [r["seed"] for r, h in zip(stac_runs, report["runs"]["heavy_hitter"])
            if all(abs(r["metrics"][k] - h["metrics"][k]) < 1e-6 for k in ("acc_mean", "comp_mean", "ate_rmse"))]
    if same:
        lines.append(
            f"- On seed(s) {', '.join(map(str, same))} `stac` scored exactly as `heavy_hitter`: with no pivot to retrieve, "
            "its attention is its hot cache alone (the same window and heavy hitters)."
        )
    full = s["full"]
    met = {True: "met", False: "not met"}
    lines.append(
        f"- Targets for the embedded model on these loops (policy `full`): ATE below 0.3 m: {full['ate_rmse']:.2f} m, "
        f"{met[full['ate_rmse'] < 0.3]}; depth Abs Rel below 0.08: {full['abs_rel']:.3f}, {met[full['abs_rel'] < 0.08]}."
    )
    lines += points_two_ways(s)
    if previous is not None and previous.is_file():
        lines += previous_comparison(report, json.loads(previous.read_text()), previous.name)
    if validation is not None and validation.is_file():
        lines += validation_comparison(json.loads(validation.read_text()), validation.name)
    lines += [
        "",
        f"![quality](benchmarks/{source.stem}.png)",
        "",
        "The first held-out loop streamed with `stac`, seen from above in the model's own frame (not aligned):"
        " ground truth, the point head's world points, and each frame's depth unprojected with its predicted"
        " camera; the black circle is the true camera path.",
        "",
        f"![reconstruction](benchmarks/{source.stem}_reconstruction.png)",
        "",
    ]
    return "\n".join(lines)


def has_pairs(s: dict) -> bool:
    """Whether the run scored the pair metrics (runs before they existed did not)."""
    return all("pose_auc_30" in s[n] and "pair_rot_deg" in s[n] for n in POLICIES if n in s)


def pair_errors_line(s: dict) -> list[str]:
    """What the pair metrics add to the ATE: how far off the cameras' orientations are."""
    if not has_pairs(s):
        return []
    bounded = [n for n in POLICIES if n in s and n != "full"]
    full = s["full"]
    return [f"- The ATE scores camera centres only. Over every pair of frames the predicted relative rotation is off by "
            f"a median of {full['pair_rot_deg']:.1f} degrees with the full cache (AUC@30 {full['pose_auc_30']:.3f}; "
            f"1 = every pair within 1 degree) and {span([s[n]['pair_rot_deg'] for n in bounded], 1)} degrees with the "
            f"bounded policies (AUC@30 {span([s[n]['pose_auc_30'] for n in bounded], 3)}): where the cameras look is "
            "as far from usable as where they are (\"Where the pose error comes from\" below)."]


KEPT_FROM = "## Quality against memory budget"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=ROOT / "docs/benchmarks/quality_cpu.json")
    p.add_argument("--training", type=Path, default=ROOT / "docs/benchmarks/training_h100.json")
    p.add_argument("--previous", type=Path, default=ROOT / "docs/benchmarks/quality_previous_checkpoint_cpu.json",
                   help="an earlier checkpoint's quality JSON to compare on shared seeds")
    p.add_argument("--validation", type=Path, default=ROOT / "docs/benchmarks/quality_validation_cpu.json",
                   help="checkpoints compared on the validation scenes (merged quality.py --scenes validation runs)")
    p.add_argument("--out", type=Path, default=ROOT / "docs/quality.md")
    args = p.parse_args()
    source = args.source.resolve()
    text = render(json.loads(source.read_text()), source, args.training.resolve(), args.previous.resolve(),
                  args.validation.resolve())
    # Sections written by other benchmarks (quality against memory budget) follow the generated part: keep them.
    kept = args.out.read_text().split(KEPT_FROM, 1) if args.out.is_file() else []
    if len(kept) == 2:
        text = text.rstrip("\n") + "\n\n" + KEPT_FROM + kept[1]
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
