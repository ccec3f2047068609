"""Writing an evaluation: ``results.json``, ``results.md`` (one table) and ``results.png`` (bars).

Every file records what produced it: the command line, the git commit, the device and the date.
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

__all__ = ["provenance", "markdown_table", "write_report", "TABLE_COLUMNS"]

# (metric key, column title, format)
TABLE_COLUMNS = (
    ("abs_rel", "Abs Rel", "{:.3f}"),
    ("delta_1.25", "delta<1.25", "{:.3f}"),
    ("acc_mean", "acc (m)", "{:.3f}"),
    ("comp_mean", "comp (m)", "{:.3f}"),
    ("nc_mean", "NC", "{:.3f}"),
    ("depth_points_acc_mean", "acc, depth + cameras (m)", "{:.3f}"),
    ("depth_points_comp_mean", "comp, depth + cameras (m)", "{:.3f}"),
    ("ate_rmse", "ATE (m)", "{:.3f}"),
    ("rpe_trans", "RPE trans (m)", "{:.3f}"),
    ("rpe_rot_deg", "RPE rot (deg)", "{:.2f}"),
    ("pair_rot_deg", "pair rot (deg)", "{:.1f}"),
    ("pose_auc_30", "AUC@30", "{:.3f}"),
)


def provenance(device: str) -> dict:
    """Command, commit, device and date of a result file."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                                    text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    if device.startswith("cuda") and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name(0)
    else:
        device_name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    script = Path(sys.argv[0]).resolve()
    program = f"python {script.relative_to(root)}" if script.suffix == ".py" and script.is_relative_to(root) else script.name
    return {"command": " ".join([program, *sys.argv[1:]]), "commit": commit + ("-dirty" if dirty else ""),
            "device": device_name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__}


def markdown_table(summary: dict, segment: str = "all") -> str:
    """One row per policy: memory, speed and the mean of each metric over sequences."""
    present = [c for c in TABLE_COLUMNS if any(c[0] in s["metrics"].get(segment, {}) for s in summary.values())]
    head = ["policy", "peak cache MiB", "bound MiB", "frames/s"] + [title for _, title, _ in present]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for policy, s in summary.items():
        bound = s.get("cache_bytes_bound")
        cells = [policy, f"{s['peak_cache_bytes'] / 2**20:.1f}", "-" if bound is None else f"{bound / 2**20:.1f}",
                 f"{s['frames_per_second']:.1f}"]
        metrics = s["metrics"].get(segment, {})
        cells += [fmt.format(metrics[key]) if key in metrics else "-" for key, _, fmt in present]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_summary(summary: dict, path: Path, title: str) -> Optional[Path]:
    """Bars per policy: memory, point-cloud error, depth error, trajectory error (where measured)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    names = list(summary)
    metrics = [summary[n]["metrics"].get("all", {}) for n in names]
    panels = [("peak cache per stream (MiB)", [[summary[n]["peak_cache_bytes"] / 2**20 for n in names]], ["peak"])]
    for keys, label in ((("acc_mean", "comp_mean"), "point cloud error (m)"), (("abs_rel",), "depth Abs Rel"),
                        (("ate_rmse",), "ATE RMSE (m)")):
        keys = [k for k in keys if all(k in m for m in metrics)]
        if keys:
            panels.append((label, [[m[k] for m in metrics] for k in keys], keys))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, (label, series, keys) in zip(axes[0], panels):
        width = 0.8 / len(series)
        for i, (values, key) in enumerate(zip(series, keys)):
            ax.bar([x + i * width for x in range(len(names))], values, width, label=key)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, rotation=30)
        ax.set_title(label, fontsize=9)
        if len(series) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: dict, out_dir: Path, title: str) -> dict[str, Path]:
    """``results.json``, ``results.md`` and ``results.png`` under ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    paths["json"].write_text(json.dumps(results, indent=1, default=float))
    prov = results.get("provenance", {})
    lines = [f"# {title}", "", f"`{prov.get('command', '')}` at commit `{prov.get('commit', '')}` on {prov.get('device', '')}, "
             f"{prov.get('date', '')}. Means over {len(results['sequences'])} sequence(s): "
             + ", ".join(f"{s['name']} ({s['frames']} frames)" for s in results["sequences"]) + ".", "",
             markdown_table(results["summary"]), ""]
    segments = sorted({seg for s in results["summary"].values() for seg in s["metrics"]} - {"all"})
    for segment in segments:
        lines += [f"Segment `{segment}` (scored under the whole sequence's alignment):", "",
                  markdown_table(results["summary"], segment), ""]
    paths["markdown"].write_text("\n".join(lines))
    png = plot_summary(results["summary"], out_dir / "results.png", title)
    if png is not None:
        paths["plot"] = png
    return paths
