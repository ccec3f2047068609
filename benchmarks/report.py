"""Turn the benchmark JSON files under docs/benchmarks/ into plots and a markdown summary.

    python benchmarks/report.py            # writes docs/benchmarks/*.png and docs/benchmarks/SUMMARY.md

Every number in SUMMARY.md (and so in README/docs) is read from a JSON file a benchmark wrote.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "docs" / "benchmarks"


def load(name: str):
    path = BENCH / name
    return json.loads(path.read_text()) if path.is_file() else None


def at_frame(steps, frame):
    for s in steps:
        if s["frame"] >= frame:
            return s
    return None


def policies_section(report, name, lines, plt):
    lines.append(f"## Cache policies, {report['preset']} on {report['device']} ({report['dtype']}, "
                 f"{report['image_hw'][1]}x{report['image_hw'][0]}, chunk {report['chunk']})\n")
    lines.append(f"Source: `{name}` (`benchmarks/policies.py`; random weights).\n")
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
        around_200 = [x["seconds_per_frame"] * 1000 for x in r["steps"] if 192 <= x["frame"] <= 208]
        median_cell = f"{statistics.median(around_200):.1f}" if around_200 else "-"
        lines.append(f"| {r['policy']} | {r['status']} | " + " | ".join(cells) + f" | {median_cell} | {mem_cells} | {bound_cell} |")
    lines.append("")
    target_line = policy_targets(report)
    if target_line:
        lines.append(target_line + "\n")
    if report.get("cuda_graphs"):
        g = report["cuda_graphs"]
        lines.append(f"CUDA graphs (`model/cuda_graphs.py`) were on: {g['captured']} captured, {g['replays']:,} replays, "
                     f"{g['eager_calls']:,} eager calls, {len(g['failed'])} failed captures.\n")
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in report["results"]:
        frames = [s["frame"] for s in r["steps"]]
        axes[0].plot(frames, [s["seconds_per_frame"] * 1000 for s in r["steps"]], label=r["policy"])
        axes[1].plot(frames, [s["cache_bytes"] / 2**30 for s in r["steps"]], label=r["policy"])
    axes[0].set(xlabel="frame", ylabel="ms per frame", title="latency per frame")
    axes[1].set(xlabel="frame", ylabel="GiB", title="cache memory per stream")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(BENCH / png_name(name), dpi=110)
    plt.close(fig)
    lines.append(f"![policies]({png_name(name)})\n")


def policy_targets(report) -> str:
    """The issue-7 ratios one policies file gives (empty when it lacks full or stac)."""
    by_name = {r["policy"]: r["steps"] for r in report["results"]}
    full, stac = by_name.get("full"), by_name.get("stac")
    if not full or not stac or not at_frame(full, 200) or not at_frame(stac, 200):
        return ""

    def median_192_208(steps):
        return statistics.median(x["seconds_per_frame"] for x in steps if 192 <= x["frame"] <= 208)

    f200, s200 = at_frame(full, 200), at_frame(stac, 200)
    parts = [f"full / stac time per frame at frame 200: {f200['seconds_per_frame'] / s200['seconds_per_frame']:.2f}x "
             f"(median of frames 192-208: {median_192_208(full) / median_192_208(stac):.2f}x)",
             f"stac cache at frame 200: 1/{f200['cache_bytes'] / s200['cache_bytes']:.1f} of full"]
    s12, s500 = at_frame(stac, 12), at_frame(stac, 500)
    if s12 and s500:
        parts.append(f"stac frame 500 / frame 12: {s500['seconds_per_frame'] / s12['seconds_per_frame']:.2f}x")
    return "Targets from this file: " + "; ".join(parts) + "."


def cuda_graphs_ab_section(lines) -> None:
    """Same-machine A/B of model/cuda_graphs.py: STAC_CUDA_GRAPHS=0 then =1, one device call."""
    rows = []
    for label in ("off", "on"):
        report = load(f"cuda_graphs_ab_h100/graphs_{label}.json")
        if report is None:
            return
        for r in report["results"]:
            after = [s["seconds_per_frame"] * 1000 for s in r["steps"] if s["frame"] > 20]
            rows.append((label, r["policy"], statistics.median(after), report["device"]))
    lines.append(f"## CUDA graphs A/B, {rows[0][3]} (one device call, off then on)\n")
    lines.append("Sources: `cuda_graphs_ab_h100/graphs_{off,on}.json` (`benchmarks/policies.py --frames 100`, stress overrides, "
                 "`STAC_CUDA_GRAPHS=0` / `=1`).\n")
    lines.append("| CUDA graphs | policy | median ms/frame after frame 20 |")
    lines.append("| --- | --- | --- |")
    for label, policy, ms, _ in rows:
        lines.append(f"| {label} | {policy} | {ms:.1f} |")
    lines.append("")


def concurrency_section(report, name, lines, plt):
    lines.append(f"## Concurrent streams in the engine, {report['preset']} on {report['device']} ({report['policy']})\n")
    graphs = report.get("cuda_graphs")  # key absent: the run predates model/cuda_graphs.py
    graphs_note = "" if "cuda_graphs" not in report else "; CUDA graphs " + (
        f"on: {graphs['captured']} captured, {graphs['replays']} replays" if graphs else "off")
    lines.append(f"Source: `{name}` (`benchmarks/engine_concurrency.py`{graphs_note}).\n")
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
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for batched, label in ((True, "one batched forward"), (False, "stream by stream")):
        pts = [(r["streams"], r["aggregate_frames_per_second"]) for r in rows if r["batched"] == batched and "aggregate_frames_per_second" in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set(xscale="log", xlabel="concurrent streams", ylabel="aggregate frames/s", title="engine throughput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(BENCH / png_name(name), dpi=110)
    plt.close(fig)
    lines.append(f"![concurrency]({png_name(name)})\n")


def kernel_section(report, name, lines, plt):
    lines.append(f"## Attention with per-key mass vs SDPA, {report['device']} (bf16, 16 heads x 64, 4164 queries)\n")
    lines.append(f"Source: `{name}` (`benchmarks/kernel_attention.py`). SDPA: PyTorch's default choice (cuDNN on "
                 "Hopper); flash: its flash backend, the one the engine uses (cuDNN is off there by default).\n")
    rows = report["rows"]
    methods = list(rows[0].get("fused_with_mass_ms_by_method", {}))
    with_bias = "sdpa_key_bias_ms" in rows[0]  # SDPA given the same per-key bias as a mask (newer files)
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


def triton_section(report, name, lines, plt):
    (label,) = report["rows"][0]["triton"].keys()  # one server setting per sweep file
    lines.append(f"## Streams through Triton vs the engine, {report['preset']} on {report['device']} "
                 f"({report['cache_config']['policy']}, server: {label}, max batch {report['max_batch_size']}, "
                 f"{report.get('output_dtype', 'float32')} outputs)\n")
    lines.append(f"Source: `{name}` (`benchmarks/triton_overhead.py`; fleet gRPC client, unpaced; "
                 f"{report['frames_per_stream']} frames per stream, START to END).\n")
    lines.append("| streams | Triton frames/s | engine frames/s | Triton/engine | per-chunk latency p50 ms | p99 ms | requests per execute |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for r in report["rows"]:
        t = r["triton"][label]
        lines.append(f"| {r['streams']} | {t['frames_per_second']:.1f} | {r['engine']['frames_per_second']:.1f} | "
                     f"{r['triton_over_engine'][label]:.2f} | {t['latency_ms']['p50']:.0f} | {t['latency_ms']['p99']:.0f} | "
                     f"{t['server']['mean_requests_per_execution']:.2f} |")
    lines.append("")
    if plt is None:
        return
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
    fig.savefig(BENCH / png_name(name), dpi=110)
    plt.close(fig)
    lines.append(f"![triton]({png_name(name)})\n")


SERVING_FILES = ("triton_overhead_h100_decoupled.json", "triton_overhead_h100_decoupled_16streams.json",
                 "triton_overhead_h200_decoupled.json", "triton_overhead_h200_decoupled_16streams.json",
                 "triton_overhead_h100.json", "triton_overhead_h100_fp16.json", "triton_overhead_h100_fp16_48frames.json",
                 "triton_overhead_h100_fp16_instances2.json", "triton_overhead_h100_fp16_inflight2.json",
                 "triton_overhead_h100_fp16_gpu_8streams.json", "triton_overhead_h100_fp16_gpu.json",
                 "triton_overhead_h100_fp16_gpu_inflight2.json",
                 "triton_overhead_h100_fp16_output_device.json",
                 "triton_queue_delay_h100_round11.json", "triton_queue_delay_h100_round11b.json",
                 "triton_queue_delay_h100_round11_shipped.json",
                 # round 12: round 11's code (old_*) and this round's (new_*), interleaved on one machine
                 *(f"triton_ab_h100_round12/{run}.json" for run in ("old_1", "new_1", "new_2", "old_2", "new_8streams")))


def label_setting(label: str, key: str, default):
    """A setting named in a triton_overhead result label (",inflight=2"), else the file-wide default."""
    for part in label.split(","):
        if part.startswith(key + "="):
            return part.split("=", 1)[1]
    return default


def serving_section(lines) -> None:
    """One row per (file, stream count, server label): the serving settings tried at a fixed load."""
    rows = []
    for name in SERVING_FILES:
        report = load(name)
        if report is None:
            continue
        # older files hold one scalar setting per file; newer ones list them and name each in the label
        file_inflight = report.get("inflight", 1)
        file_inflight = file_inflight if isinstance(file_inflight, int) else 1
        file_device = report.get("output_device", "cpu")
        for r in report["rows"]:
            for label, t in r["triton"].items():
                s = t["server"]
                rows.append(f"| `{name}` | {r['streams']} | {report.get('output_dtype', 'float32')} | "
                            f"{label_setting(label, 'output_device', file_device)} | "
                            f"{'yes' if 'decoupled' in label.split(',') else 'no'} | {report.get('instances', 1)} | "
                            f"{report['max_batch_size']} | {int(label_setting(label, 'queue_delay_us', 100000)) / 1000:g} | "
                            f"{label_setting(label, 'inflight', file_inflight)} | {report['frames_per_stream']} | "
                            f"{t['frames_per_second']:.1f} | "
                            f"{r['engine']['frames_per_second']:.1f} | **{r['triton_over_engine'][label]:.2f}** | "
                            f"{s['mean_requests_per_execution']:.1f} | {s['per_request_ms'].get('compute_infer', 0):.0f} | "
                            f"{s['per_request_ms'].get('compute_output', 0):.0f} |")
    if not rows:
        return
    lines.append("## Triton serving settings at a fixed load (same frames through Triton and the engine)\n")
    lines.append("Sources: `triton_overhead_h*.json`, `triton_queue_delay_h100_round11*.json` and "
                 "`triton_ab_h100_round12/*.json` "
                 "(`benchmarks/triton_overhead.py`, oldest strategy; max batch, also the preferred batch, and queue "
                 "delay as listed). infer/output ms: Triton's per-request compute_infer / "
                 "compute_output (a decoupled model sends its responses itself: no compute_output). Ratios compare "
                 "Triton and the engine within one file (one machine).\n")
    lines.append("| file | streams | dense outputs | outputs handed over on | decoupled | instances | max batch | queue delay ms | "
                 "in flight per stream | "
                 "frames per stream | Triton frames/s | engine frames/s | Triton/engine | requests per execute | "
                 "infer ms | output ms |")
    lines.append("| --- " * 16 + "|")
    lines.extend(rows)
    lines.append("")
    path_rows = []
    for name in ("serving_path_h100.json", "serving_path_h100_fp32.json"):
        report = load(name)
        if report is not None:
            ms = report["median_ms_per_step"]
            path_rows.append(f"| `{name}` | {report['streams']} | {report['output_dtype']} | {ms['engine_push_many']:.0f} | "
                             f"{ms['sessions_handle']:.0f} | {ms['outputs_on_host_all_requests']:.1f} |")
    if path_rows:
        lines.append("The model's own serving code in-process, without Triton (`benchmarks/serving_path.py`): one "
                     "batched step through the engine, through the serving sessions, and the outputs' host copy; "
                     "median ms per step.\n")
        lines.append("| file | streams | dense outputs | engine push_many | sessions handle | outputs to host |")
        lines.append("| --- | --- | --- | --- | --- | --- |")
        lines.extend(path_rows)
        lines.append("")


POOL_FILES = (("merge_round + collapse_rows kernels", "pool_insert_h100.json"),
              ("eager torch ops (STAC_POOL_KERNELS=0)", "pool_insert_h100_eager.json"),
              ("round 4: nearest_pivot + weighted_row_sums kernels", "pool_insert_h100_round4.json"))


def pool_section(lines) -> None:
    rows = []
    for label, name in POOL_FILES:
        r = load(name)
        if r is None:
            continue
        methods = r.get("method_ms") or {}
        by = lambda m: f"{methods[m]['ms']:.1f}" if m in methods and methods[m]["calls"] else "-"  # noqa: E731
        rows.append(f"| {label} | `{name}` | {r['tokens']:,} | {r['insert_ms']['median']:.1f} | {by('_round')} | "
                    f"{by('_fill_buffers')} | {by('_collapse')} |")
    if not rows:
        return
    lines.append("## Voxel-pool insert of one stress step (kernels vs eager torch ops)\n")
    lines.append("Sources: `pool_insert_h100*.json` (`benchmarks/pool_insert.py --by-method`): the same captured insert "
                 "replayed on copies of the pool's state; the by-method columns are one more replay with a "
                 "synchronisation around each method (nested: fill_buffers holds collapse, round holds both).\n")
    lines.append("| implementation | file | tokens filed | insert ms (median of 5) | rounds ms | fill_buffers ms | collapse ms |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    lines.extend(rows)
    lines.append("")


def merge_round_section(lines) -> None:
    """The merge_round launch configurations replayed on the same captured insert (one file each)."""
    rows = []
    for path in sorted(BENCH.glob("pool_insert_h200_merge_*_step*.json")):
        r = json.loads(path.read_text())
        tokens, warps = r["merge_round_config"].split(",")
        rows.append((r["warm_steps"], int(tokens), int(warps), r["insert_ms"]["median"], path.name))
    if not rows:
        return
    lines.append("## merge_round launch configuration (H200, round 6's code, the same captured insert per pool state)\n")
    lines.append("Sources: `pool_insert_h200_merge_*.json` (`benchmarks/pool_insert.py --merge-round-config TOKENS,WARPS`; "
                 "pool state after 40 steps (frame 160) or 122 steps (frame 488) of the stress stream).\n")
    lines.append("| pool state after steps | tokens per iteration | warps | insert ms (median of 5) | file |")
    lines.append("| --- | --- | --- | --- | --- |")
    for steps, tokens, warps, ms, name in sorted(rows):
        lines.append(f"| {steps} | {tokens} | {warps} | {ms:.1f} | `{name}` |")
    lines.append("")


# Round 7 (H200): the insert as one kernel; labelled by hand (the launch was the code's default).
POOL_ROUND7_FILES = (("round-6 code: merge_round + collapse_rows, rounds in torch", "pool_insert_h200_round6code_step48.json"),
                     ("round-6 code, A/B run", "pool_insert_h200_ab_round6code.json"),
                     ("insert_rows, 16 tokens x 2 warps, A/B run", "pool_insert_h200_ab_fused_16x2.json"),
                     ("insert_rows, 8 tokens x 1 warp (the automatic launch's pick at ~23 tokens per row)",
                      "pool_insert_h200_round7.json"))


def pool_round7_section(lines) -> None:
    rows = [(label, name, load(name)) for label, name in POOL_ROUND7_FILES]
    rows = [(label, name, r) for label, name, r in rows if r is not None]
    if not rows:
        return
    lines.append("## Voxel-pool insert as one kernel (H200, round 7)\n")
    lines.append("Sources: `benchmarks/pool_insert.py` (default stress geometry, pool state after 48 steps; the same "
                 "captured insert replayed 5 times on copies of the pool).\n")
    lines.append("| implementation | file | tokens filed | insert ms (median of 5) |")
    lines.append("| --- | --- | --- | --- |")
    for label, name, r in rows:
        lines.append(f"| {label} | `{name}` | {r['tokens']:,} | {r['insert_ms']['median']:.2f} |")
    lines.append("")


def stac_ab_section(lines) -> None:
    """Same-call A/B of the stac step: round-6 code (old_*) and round-7 code (new_*), interleaved."""
    rows = []
    for path in sorted((BENCH / "stac_ab_h200_round7").glob("*.json")):
        for r in json.loads(path.read_text())["results"]:
            ms = [s["seconds_per_frame"] * 1000 for s in r["steps"] if s["frame"] > 60]
            around = [s["seconds_per_frame"] * 1000 for s in r["steps"] if 192 <= s["frame"] <= 208]
            rows.append((path.name, r["policy"], statistics.median(around), statistics.median(ms)))
    if not rows:
        return
    lines.append("## stac step A/B, round-6 vs round-7 code (H200, one device call, runs interleaved)\n")
    lines.append("Sources: `stac_ab_h200_round7/*.json` (`benchmarks/policies.py`, 232 frames, stress overrides; "
                 "`old_*` ran round 6's code, `new_*` this round's with two settings since changed: insert_rows at 16 tokens "
                 "x 2 warps and the retrieval's candidate voxels marked by an accumulating index_put_).\n")
    lines.append("| file | policy | median ms/frame @192-208 | median ms/frame after frame 60 |")
    lines.append("| --- | --- | --- | --- |")
    for name, policy, around, after in rows:
        lines.append(f"| `{name}` | {policy} | {around:.2f} | {after:.2f} |")
    lines.append("")


def folder_ab_section(lines, folder: str, title: str, source: str) -> None:
    """One row per (file, policy) of a folder of policies.py runs made in one device call.

    The A/B folders hold the same command run with one setting changed (file names say which);
    medians over frame windows are steadier than single frames on a shared GPU.
    """
    rows, targets = [], []
    for path in sorted((BENCH / folder).glob("*.json")):
        report = json.loads(path.read_text())
        if policy_targets(report):
            targets.append(f"- `{path.name}`: " + policy_targets(report)[len("Targets from this file: "):])
        for r in report["results"]:
            def median_ms(lo, hi):
                ms = [s["seconds_per_frame"] * 1000 for s in r["steps"] if lo <= s["frame"] <= hi]
                return f"{statistics.median(ms):.1f}" if ms else "-"
            last = r["steps"][-1]
            oom = r.get("memory_at_oom") or {}
            reserved = oom.get("reserved_bytes", last.get("reserved_bytes"))
            allocated = oom.get("allocated_bytes", last.get("allocated_bytes"))
            gib = lambda b: f"{b / 2**30:.1f}" if b else "-"  # noqa: E731
            rows.append((path.name, r["policy"], r["status"], median_ms(21, 100), median_ms(101, 180),
                         median_ms(181, 240), last["frame"], f"{last['cache_bytes'] / 2**20:,.0f}",
                         gib(allocated), gib(reserved), report.get("allocator_conf") or "default", report["device"]))
    if not rows:
        return
    lines.append(f"## {title}, {rows[0][-1]}\n")
    lines.append(f"Sources: `{folder}/*.json` ({source}).\n")
    lines.append("| file | policy | status | median ms/frame 21-100 | 101-180 | 181-240 | last frame | cache MiB there "
                 "| allocated GiB | reserved GiB | allocator |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        lines.append("| `" + row[0] + "` | " + " | ".join(str(c) for c in row[1:-1]) + " |")
    lines.append("")
    if targets:
        lines.extend(["Targets per file:", ""] + targets + [""])


# (folder, title, how it was made): same-call A/B runs of round 9 on.
AB_FOLDERS = (
    ("full_growth_ab_h100_round9", "Full cache: exact concatenation vs spare capacity (round 9)",
     "`benchmarks/policies.py --policies full,stac,window --frames 240`, stress overrides; `exact_*` the default "
     "`full_growth` 1.0, `growth_*` `--full-overrides '{\"full_growth\": 1.25}'`; runs interleaved"),
    ("full_memory_h100_round9", "Full cache to 600 frames: default allocator vs expandable segments (round 9)",
     "`benchmarks/policies.py --policies full --frames 600`; `exact_expandable` with "
     "`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`; allocated/reserved at the out-of-memory error or the last frame"),
    ("step_ids_ab_h100_round10", "Step token ids shared across layers A/B (round 10)",
     "`benchmarks/policies.py --policies stac,window --frames 100`, stress overrides; `old_*` 72b50cf, `new_*` b6f1047 "
     "(step ids made once per step; reverted next: no gain); runs interleaved"),
    ("cuda_graphs_ab_h100_round9", "CUDA graphs A/B (round 9)",
     "`benchmarks/policies.py --policies stac,window --frames 100`, stress overrides, `STAC_CUDA_GRAPHS=0` / `=1`"),
)


def png_name(json_name: str) -> str:
    return json_name[: -len(".json")] + ".png"


# (file, section): round 10's H100 files, round 8's H100 and H200 files, the H200 files of rounds 6-7,
# the H100 files of rounds 1-5.
SECTIONS = (("triton_sweep_h100_round10.json", "triton"), ("kernel_attention_h100_round10.json", "kernel"),
            ("policies_vggt1b_h100_round8.json", "policies"), ("policies_vggt1b_h100_1000.json", "policies"),
            ("policies_vggt1b_h200_1000_expandable.json", "policies"),
            ("engine_concurrency_h100_round8.json", "concurrency"), ("engine_concurrency_h100_round8_graphs.json", "concurrency"),
            ("policies_vggt1b_h200.json", "policies"), ("policies_vggt1b_h200_round6.json", "policies"),
            ("policies_vggt1b_h200_round7_final_code_slow_phase.json", "policies"),
            ("policies_vggt1b_h200_all_policies.json", "policies"),
            ("engine_concurrency_h200.json", "concurrency"), ("engine_concurrency_h200_round7.json", "concurrency"),
            ("kernel_attention_h200.json", "kernel"),
            ("policies_vggt1b_h100.json", "policies"), ("engine_concurrency_h100.json", "concurrency"),
            ("triton_sweep_h100.json", "triton"), ("kernel_attention_h100.json", "kernel"))


def main() -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
        print("matplotlib not installed: writing tables only", file=sys.stderr)
    lines = ["# Benchmark summary (generated by benchmarks/report.py from the JSON files here)\n"]
    sections = {"policies": policies_section, "concurrency": concurrency_section, "triton": triton_section,
                "kernel": kernel_section}
    for name, kind in SECTIONS:
        report = load(name)
        if report is not None:
            sections[kind](report, name, lines, plt)
    for folder, title, source in AB_FOLDERS:
        folder_ab_section(lines, folder, title, source)
    cuda_graphs_ab_section(lines)
    serving_section(lines)
    pool_round7_section(lines)
    stac_ab_section(lines)
    pool_section(lines)
    merge_round_section(lines)
    (BENCH / "SUMMARY.md").write_text("\n".join(lines))
    print((BENCH / "SUMMARY.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
