"""Turn the benchmark results under docs/benchmarks/ into docs/benchmarks/SUMMARY.md (and plots).

    python benchmarks/report.py                          # rebuild SUMMARY.md (and the PNG plots if matplotlib is there)
    python benchmarks/report.py merge OUT.json LABEL=RUN.json ...   # several runs of one benchmark -> one file

Files are found by the run record each one carries (``"run": {"benchmark", "command", "commit",
"device", "date"}`` in JSON, ``# key: value`` lines at the top of text results; written by
``stac_backend.results``), never by name. docs/benchmarks/ keeps one current file per benchmark and
device, named ``BENCHMARK_DEVICE.json``; two files claiming the same pair are an error. A file may
hold several runs of its benchmark (an A/B, or repeats on one machine) under ``"runs"``, each a
complete result with a ``label``. Plots, logs, CSVs and profiles beside a JSON result share its name.

Every number in SUMMARY.md (and so in the README and docs/performance.md) is read from these files.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from stac_backend.results import device_key, read_text_run

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "docs" / "benchmarks"
RESULT_SUFFIXES = (".json", ".txt")


# Finding results -----------------------------------------------------------------------------------


def read_run(path: Path) -> dict:
    """The run record of a result file ({} when it has none)."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return data.get("run", {}) if isinstance(data, dict) else {}
    return read_text_run(path)


def find_results(folder: Path = BENCH) -> dict[tuple[str, str], Path]:
    """{(benchmark, device key): file} over every result file of ``folder``.

    Raises ValueError when two files record the same benchmark and device: one of them is
    superseded and should be deleted (git keeps it).
    """
    found: dict[tuple[str, str], Path] = {}
    for path in sorted(Path(folder).iterdir()):
        if path.suffix not in RESULT_SUFFIXES or not path.is_file():
            continue
        if path.suffix != ".json" and path.with_suffix(".json").is_file():
            continue  # a profile or log beside its JSON result
        run = read_run(path)
        if not run.get("benchmark"):
            continue
        key = (run["benchmark"], device_key(run.get("device", "")))
        if key in found:
            raise ValueError(f"{found[key].name} and {path.name} both record benchmark {key[0]!r} on {key[1]}: "
                             "keep the current one, delete the other (git keeps it)")
        found[key] = path
    return found


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def runs_of(report: dict) -> list[tuple[str | None, dict]]:
    """(label, result) of every run a file holds: one unlabelled run, or its ``runs``."""
    if "runs" in report and isinstance(report["runs"], list) and report["runs"] and "label" in report["runs"][0]:
        return [(r["label"], r) for r in report["runs"]]
    return [(None, report)]


def merge(out: Path, labelled: list[tuple[str, Path]]) -> dict:
    """One file of several runs of one benchmark on one device (the merge command)."""
    runs = []
    for label, path in labelled:
        data = load(path)
        runs.append({"label": label, **data})
    records = [r.get("run", {}) for r in runs]
    benchmarks = {r.get("benchmark") for r in records}
    devices = {device_key(r.get("device", "")) for r in records}
    if len(benchmarks) != 1 or len(devices) != 1:
        raise ValueError(f"runs of one benchmark on one device only: got {sorted(map(str, benchmarks))} on {sorted(devices)}")
    top = {"benchmark": records[0]["benchmark"], "command": "\n".join(dict.fromkeys(r.get("command", "") for r in records)),
           "commit": records[-1].get("commit"), "device": records[0].get("device"),
           "date": max(r.get("date", "") for r in records)}
    merged = {"run": top, "runs": runs}
    out.write_text(json.dumps(merged, indent=1))
    return merged


# Sections --------------------------------------------------------------------------------------------


def at_frame(steps, frame):
    for s in steps:
        if s["frame"] >= frame:
            return s
    return None


def median_ms(steps, lo, hi):
    ms = [s["seconds_per_frame"] * 1000 for s in steps if lo <= s["frame"] <= hi]
    return statistics.median(ms) if ms else None


def source_line(path: Path, script: str) -> str:
    run = read_run(path)
    return (f"Source: `{path.name}` (`{script}`; {run.get('device', '?')}, commit {run.get('commit') or '?'}, "
            f"{run.get('date', '?')[:10]}).\n")


def policies_section(path: Path, lines: list[str], plt) -> None:
    report = load(path)
    lines.append(f"## Cache policies, {report['preset']} on {report['device']} ({report['dtype']}, "
                 f"{report['image_hw'][1]}x{report['image_hw'][0]}, chunk {report['chunk']})\n")
    lines.append(source_line(path, "benchmarks/policies.py") + "Random weights.\n")
    lines.append("| policy | status | ms/frame @12 | @200 | @500 | @1000 | median @192-208 | cache MiB @200 | @1000 | bound MiB |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in report["results"]:
        cells = []
        for f in (12, 200, 500, 1000):
            s = at_frame(r["steps"], f)
            cells.append(f"{s['seconds_per_frame'] * 1000:.1f}" if s else "-")
        mem = [at_frame(r["steps"], f) for f in (200, 1000)]
        bound = r.get("memory_bound_bytes")
        bound_cell = f"{bound / 2**20:.0f}" if bound else "unbounded"
        mem_cells = " | ".join(f"{m['cache_bytes'] / 2**20:.0f}" if m else "-" for m in mem)
        around_200 = median_ms(r["steps"], 192, 208)
        median_cell = f"{around_200:.1f}" if around_200 else "-"
        lines.append(f"| {r['policy']} | {r['status']} | " + " | ".join(cells) + f" | {median_cell} | {mem_cells} | {bound_cell} |")
    lines.append("")
    target_line = policy_targets(report)
    if target_line:
        lines.append(target_line + "\n")
    if report.get("cuda_graphs"):
        g = report["cuda_graphs"]
        lines.append(f"CUDA graphs (`model/cuda_graphs.py`) were on: {g['captured']} captured, {g['replays']:,} replays, "
                     f"{g['eager_calls']:,} eager calls, {len(g['failed'])} failed captures.\n")
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for r in report["results"]:
            frames = [s["frame"] for s in r["steps"]]
            axes[0].plot(frames, [s["seconds_per_frame"] * 1000 for s in r["steps"]], label=r["policy"])
            axes[1].plot(frames, [s["cache_bytes"] / 2**30 for s in r["steps"]], label=r["policy"])
        axes[0].set(xlabel="frame", ylabel="ms per frame", title="latency per frame")
        axes[1].set(xlabel="frame", ylabel="GiB", title="cache memory per stream")
        axes[1].legend()
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"), dpi=110)
        plt.close(fig)
    if path.with_suffix(".png").is_file():
        lines.append(f"![policies]({path.stem}.png)\n")


def policy_targets(report) -> str:
    """The target ratios one policies result gives (empty when it lacks full or stac)."""
    by_name = {r["policy"]: r["steps"] for r in report["results"]}
    full, stac = by_name.get("full"), by_name.get("stac")
    if not full or not stac or not at_frame(full, 200) or not at_frame(stac, 200):
        return ""
    f200, s200 = at_frame(full, 200), at_frame(stac, 200)
    parts = [f"full / stac time per frame at frame 200: {f200['seconds_per_frame'] / s200['seconds_per_frame']:.2f}x "
             f"(median of frames 192-208: {median_ms(full, 192, 208) / median_ms(stac, 192, 208):.2f}x)",
             f"stac cache at frame 200: 1/{f200['cache_bytes'] / s200['cache_bytes']:.1f} of full"]
    s12, s500 = at_frame(stac, 12), at_frame(stac, 500)
    if s12 and s500:
        parts.append(f"stac frame 500 / frame 12: {s500['seconds_per_frame'] / s12['seconds_per_frame']:.2f}x")
    return "Targets from this result: " + "; ".join(parts) + "."


def policies_ab_section(path: Path, lines: list[str], title: str, how: str) -> None:
    """One row per (run, policy) of a file holding several policies.py runs made on one machine."""
    report = load(path)
    rows, targets = [], []
    for label, run in runs_of(report):
        if policy_targets(run):
            targets.append(f"- `{label}`: " + policy_targets(run)[len("Targets from this result: "):])
        for r in run["results"]:
            last = r["steps"][-1]
            oom = r.get("memory_at_oom") or {}
            reserved = oom.get("reserved_bytes", last.get("reserved_bytes"))
            allocated = oom.get("allocated_bytes", last.get("allocated_bytes"))
            gib = lambda b: f"{b / 2**30:.1f}" if b else "-"  # noqa: E731
            ms = lambda lo, hi: f"{median_ms(r['steps'], lo, hi):.1f}" if median_ms(r["steps"], lo, hi) else "-"  # noqa: E731
            rows.append((label, r["policy"], r["status"], ms(21, 100), ms(101, 180), ms(181, 240), last["frame"],
                         f"{last['cache_bytes'] / 2**20:,.0f}", gib(allocated), gib(reserved),
                         run.get("allocator_conf") or "default"))
    lines.append(f"## {title}, {report['run']['device']}\n")
    lines.append(source_line(path, "benchmarks/policies.py") + how + "\n")
    lines.append("| run | policy | status | median ms/frame 21-100 | 101-180 | 181-240 | last frame | cache MiB there "
                 "| allocated GiB | reserved GiB | allocator |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        lines.append("| `" + str(row[0]) + "` | " + " | ".join(str(c) for c in row[1:]) + " |")
    lines.append("")
    if targets:
        lines.extend(["Targets per run:", ""] + targets + [""])


POLICIES_AB = {
    "full_growth_ab": ("Full cache: exact concatenation vs spare capacity",
                       "`exact_*`: the default `full_growth` 1.0; `growth_*`: `--full-overrides '{\"full_growth\": 1.25}'`; "
                       "runs interleaved on one machine, stress overrides."),
    "full_allocator": ("Full cache to 600 frames: default allocator vs expandable segments",
                       "`expandable_segments` ran with `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`; allocated/reserved "
                       "at the out-of-memory error or the last frame."),
    "cuda_graphs_ab": ("CUDA graphs for the cache-free parts of a step, off and on",
                       "`STAC_CUDA_GRAPHS=0` / `=1`, one machine, stress overrides."),
}


def concurrency_section(path: Path, lines: list[str], plt) -> None:
    report = load(path)
    lines.append(f"## Concurrent streams in the engine, {report['preset']} on {report['device']} ({report['policy']})\n")
    graphs = report.get("cuda_graphs")
    graphs_note = "" if "cuda_graphs" not in report else "CUDA graphs " + (
        f"on: {graphs['captured']} captured, {graphs['replays']} replays.\n" if graphs else "off.\n")
    lines.append(source_line(path, "benchmarks/engine_concurrency.py") + graphs_note)
    lines.append("| streams | batched frames/s | stream-by-stream frames/s | per-stream frames/s (batched) | step s | peak GPU GiB |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    rows = report["rows"]
    for n in sorted({r["streams"] for r in rows}):
        b = next((r for r in rows if r["streams"] == n and r["batched"]), {})
        s = next((r for r in rows if r["streams"] == n and not r["batched"]), {})
        fmt = lambda r, k, scale=1.0: f"{r[k] * scale:.1f}" if r.get(k) is not None else r.get("status", "-")  # noqa: E731
        lines.append(f"| {n} | {fmt(b, 'aggregate_frames_per_second')} | {fmt(s, 'aggregate_frames_per_second')} | "
                     f"{fmt(b, 'per_stream_frames_per_second')} | {fmt(b, 'step_seconds_mean')} | {fmt(b, 'peak_gpu_bytes', 2**-30)} |")
    lines.append("")
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for batched, label in ((True, "one batched forward"), (False, "stream by stream")):
            pts = [(r["streams"], r["aggregate_frames_per_second"]) for r in rows if r["batched"] == batched and "aggregate_frames_per_second" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set(xscale="log", xlabel="concurrent streams", ylabel="aggregate frames/s", title="engine throughput")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"), dpi=110)
        plt.close(fig)
    if path.with_suffix(".png").is_file():
        lines.append(f"![concurrency]({path.stem}.png)\n")


def kernel_section(path: Path, lines: list[str], plt) -> None:
    report = load(path)
    lines.append(f"## Attention with per-key mass vs SDPA, {report['device']} (bf16, 16 heads x 64, 4164 queries)\n")
    lines.append(source_line(path, "benchmarks/kernel_attention.py") + "SDPA: PyTorch's default choice (cuDNN on "
                 "Hopper); flash: its flash backend, the one the engine uses (cuDNN is off there by default).\n")
    rows = report["rows"]
    methods = list(rows[0].get("fused_with_mass_ms_by_method", {}))
    with_bias = "sdpa_key_bias_ms" in rows[0]
    lines.append("| batch | key frames | SDPA ms (no mass) | SDPA flash ms | fused ms (with mass) | fused/SDPA | fused/flash | "
                 "fused ms (no mass) | " + "".join(f"mass: {m} ms | " for m in methods) + "blockwise reference ms |"
                 + (" SDPA with key bias ms | fused/SDPA with key bias |" if with_bias else ""))
    lines.append("| --- " * (9 + len(methods) + 2 * with_bias) + "|")

    def ms(value, digits=2):
        return f"{value:.{digits}f}" if value else "-"

    for r in rows:
        flash = r.get("sdpa_flash_ms")
        cells = [r["batch"], r["key_frames"], ms(r["sdpa_ms"]), ms(flash), ms(r["fused_with_mass_ms"]),
                 ms(r["fused_over_sdpa"]), ms(flash and r["fused_with_mass_ms"] / flash), ms(r["fused_no_mass_ms"]),
                 *(ms(r["fused_with_mass_ms_by_method"][m]) for m in methods), ms(r.get("reference_blockwise_ms"), 1)]
        if with_bias:
            biased = r.get("sdpa_key_bias_ms")
            cells += [ms(biased), ms(biased and r["fused_with_mass_ms"] / biased)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if "mass_method" in rows[0]:
        lines.append(f"\nfused ms (with mass) uses the default key-mass method, `{rows[0]['mass_method']}`.")
    lines.append("")


def triton_sweep_section(path: Path, lines: list[str], plt) -> None:
    report = load(path)
    (label,) = report["rows"][0]["triton"].keys()  # one server setting per sweep
    lines.append(f"## Streams through Triton vs the engine, {report['preset']} on {report['device']} "
                 f"({report['cache_config']['policy']}, server: {label}, max batch {report['max_batch_size']}, "
                 f"{report.get('output_dtype', 'float32')} outputs)\n")
    lines.append(source_line(path, "benchmarks/triton_overhead.py") + f"Fleet gRPC client, unpaced; "
                 f"{report['frames_per_stream']} frames per stream, START to END.\n")
    lines.append("| streams | Triton frames/s | engine frames/s | Triton/engine | per-chunk latency p50 ms | p99 ms | requests per execute |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for r in report["rows"]:
        t = r["triton"][label]
        lines.append(f"| {r['streams']} | {t['frames_per_second']:.1f} | {r['engine']['frames_per_second']:.1f} | "
                     f"{r['triton_over_engine'][label]:.2f} | {t['latency_ms']['p50']:.0f} | {t['latency_ms']['p99']:.0f} | "
                     f"{t['server']['mean_requests_per_execution']:.2f} |")
    lines.append("")
    if plt is not None:
        streams = [r["streams"] for r in report["rows"]]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        axes[0].plot(streams, [r["triton"][label]["frames_per_second"] for r in report["rows"]], marker="o", label="Triton (gRPC fleet)")
        axes[0].plot(streams, [r["engine"]["frames_per_second"] for r in report["rows"]], marker="o", label="in-process engine")
        axes[0].set(xscale="log", xlabel="concurrent streams", ylabel="aggregate frames/s", title="throughput")
        axes[0].legend()
        axes[1].plot(streams, [r["triton"][label]["latency_ms"]["p50"] for r in report["rows"]], marker="o", label="p50")
        axes[1].plot(streams, [r["triton"][label]["latency_ms"]["p99"] for r in report["rows"]], marker="o", label="p99")
        axes[1].set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="ms per chunk", title="per-stream latency through Triton")
        axes[1].legend()
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"), dpi=110)
        plt.close(fig)
    if path.with_suffix(".png").is_file():
        lines.append(f"![triton]({path.stem}.png)\n")


def label_setting(label: str, key: str, default):
    """A setting named in a triton_overhead result label (",inflight=2"), else the file-wide default."""
    for part in label.split(","):
        if part.startswith(key + "="):
            return part.split("=", 1)[1]
    return default


SERVING_BENCHMARKS = ("triton_overhead", "triton_decoupled", "triton_queue_delay", "triton_output_device")


def serving_section(found: dict, lines: list[str]) -> None:
    """One row per (file, run, stream count, server setting): serving settings at a fixed load."""
    rows = []
    for (benchmark, device), path in sorted(found.items()):
        if benchmark not in SERVING_BENCHMARKS:
            continue
        for run_label, report in runs_of(load(path)):
            file_inflight = report.get("inflight", 1)
            file_inflight = file_inflight if isinstance(file_inflight, int) else 1
            file_device = report.get("output_device", "cpu")
            for r in report["rows"]:
                for label, t in r["triton"].items():
                    s = t["server"]
                    rows.append(f"| `{path.name}` | {run_label or '-'} | {r['streams']} | {report.get('output_dtype', 'float32')} | "
                                f"{label_setting(label, 'output_device', file_device)} | "
                                f"{'yes' if 'decoupled' in label.split(',') else 'no'} | {report.get('instances', 1)} | "
                                f"{report['max_batch_size']} | {int(label_setting(label, 'queue_delay_us', 100000)) / 1000:g} | "
                                f"{label_setting(label, 'inflight', file_inflight)} | {report['frames_per_stream']} | "
                                f"{t['frames_per_second']:.1f} | "
                                f"{r['engine']['frames_per_second']:.1f} | **{r['triton_over_engine'][label]:.2f}** | "
                                f"{s['mean_requests_per_execution']:.1f} | {s['per_request_ms'].get('compute_infer', 0):.0f} | "
                                f"{s['per_request_ms'].get('compute_output', 0):.0f} |")
    if rows:
        lines.append("## Triton serving settings at a fixed load (same frames through Triton and the engine)\n")
        lines.append("Sources: the `triton_overhead`, `triton_decoupled`, `triton_queue_delay` and `triton_output_device` "
                     "results (`benchmarks/triton_overhead.py`, oldest strategy; max batch, also the preferred batch, and "
                     "queue delay as listed). infer/output ms: Triton's per-request compute_infer / compute_output (a "
                     "decoupled model sends its responses itself: no compute_output). Ratios compare Triton and the "
                     "engine within one run (one machine).\n")
        lines.append("| file | run | streams | dense outputs | outputs handed over on | decoupled | instances | max batch | "
                     "queue delay ms | in flight per stream | frames per stream | Triton frames/s | engine frames/s | "
                     "Triton/engine | requests per execute | infer ms | output ms |")
        lines.append("| --- " * 17 + "|")
        lines.extend(rows)
        lines.append("")
    path_rows = []
    for (benchmark, device), path in sorted(found.items()):
        if benchmark != "serving_path":
            continue
        for run_label, report in runs_of(load(path)):
            ms = report["median_ms_per_step"]
            path_rows.append(f"| `{path.name}` | {run_label or '-'} | {report['streams']} | {report['output_dtype']} | "
                             f"{ms['engine_push_many']:.0f} | {ms['sessions_handle']:.0f} | {ms['outputs_on_host_all_requests']:.1f} |")
    if path_rows:
        lines.append("## The serving code in-process, without Triton\n")
        lines.append("Source: `benchmarks/serving_path.py`: one batched step through the engine, through the serving "
                     "sessions, and the outputs' host copy; median ms per step.\n")
        lines.append("| file | run | streams | dense outputs | engine push_many | sessions handle | outputs to host |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        lines.extend(path_rows)
        lines.append("")


def pool_section(found: dict, lines: list[str]) -> None:
    rows = []
    for (benchmark, device), path in sorted(found.items()):
        if benchmark != "pool_insert" or path.suffix != ".json":
            continue
        data = load(path)
        for r in data.get("runs") or [data]:  # a merged file holds labelled side-by-side runs
            methods = r.get("method_ms") or {}
            by = lambda m: f"{methods[m]['ms']:.1f}" if m in methods and methods[m]["calls"] else "-"  # noqa: E731
            name = f"`{path.name}`" + (f" ({r['label']})" if "label" in r else "")
            other = r.get("compared_with")
            versus = f"{other['insert_ms']['median']:.2f} ({r['insert_ms']['median'] / other['insert_ms']['median']:.2f}x)" if other else "-"
            rows.append(f"| {name} | {r.get('device') or r['run']['device']} | {r['tokens']:,} | {r['insert_ms']['median']:.2f} | {versus} | "
                        f"{r.get('kernel_config') or 'automatic'} | {by('_round')} | {by('_fill_buffers')} | {by('_collapse')} |")
    if rows:
        lines.append("## Voxel-pool insert of one stress step\n")
        lines.append("Source: `benchmarks/pool_insert.py`: the same captured insert replayed on copies of the pool's "
                     "state (pool after 48 steps of the stress stream); the by-method columns, when measured, are one "
                     "more replay with a synchronisation around each method.\n")
        lines.append("| file | device | tokens filed | insert ms (median) | compared kernel ms (ratio) | launch | rounds ms | fill_buffers ms | collapse ms |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        lines.extend(rows)
        lines.append("")


def index_section(found: dict, lines: list[str]) -> None:
    lines.append("## Result files\n")
    lines.append("One current file per benchmark and device; the command reproduces it (from the checkout's root, "
                 "on that device). Superseded files are in git history.\n")
    lines.append("| benchmark | device | file | date | commit | command |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for (benchmark, device), path in sorted(found.items()):
        run = read_run(path)
        command = (run.get("command") or "").replace("\n", "<br>").replace("|", "\\|")
        lines.append(f"| {benchmark} | {device} | `{path.name}` | {run.get('date', '?')[:10]} | {run.get('commit') or '?'} "
                     f"| `{command}` |" if "<br>" not in command else
                     f"| {benchmark} | {device} | `{path.name}` | {run.get('date', '?')[:10]} | {run.get('commit') or '?'} "
                     f"| {command} |")
    lines.append("")


SECTIONS = (("triton_sweep", triton_sweep_section), ("policies", policies_section),
            ("engine_concurrency", concurrency_section), ("kernel_attention", kernel_section))


def build(folder: Path = BENCH, plt=None) -> str:
    found = find_results(folder)
    lines = ["# Benchmark summary\n",
             "Generated by `python benchmarks/report.py` from the result files in this folder; "
             "`docs/performance.md` says what the numbers mean.\n"]
    index_section(found, lines)
    for benchmark, section in SECTIONS:
        for (name, device), path in sorted(found.items()):
            if name == benchmark:
                section(path, lines, plt)
    for benchmark, (title, how) in POLICIES_AB.items():
        for (name, device), path in sorted(found.items()):
            if name == benchmark:
                policies_ab_section(path, lines, title, how)
    serving_section(found, lines)
    pool_section(found, lines)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["merge"]:
        if len(argv) < 3:
            print("usage: report.py merge OUT.json LABEL=RUN.json [LABEL=RUN.json ...]", file=sys.stderr)
            return 2
        labelled = [(item.split("=", 1)[0], Path(item.split("=", 1)[1])) for item in argv[2:]]
        merge(Path(argv[1]), labelled)
        print(f"wrote {argv[1]} ({len(labelled)} runs)")
        return 0
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
        print("matplotlib not installed: writing tables only (existing plots are kept)", file=sys.stderr)
    text = build(BENCH, plt)
    (BENCH / "SUMMARY.md").write_text(text)
    print(f"wrote {BENCH / 'SUMMARY.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
