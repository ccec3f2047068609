"""Soak test: many camera streams for a long time through a local tritonserver; memory must stay flat.

Starts a tritonserver with the stac model (tiny preset, CPU), runs ``--streams`` concurrent streams
of ``--frames`` frames each through it (``stac_backend.loadgen.fleet``), and samples the resident
memory of the whole server process tree (tritonserver + Python-backend stubs, from /proc) and the
model's own metrics every ``--sample-interval`` seconds. Memory is "flat" when the median RSS over
the last ``--tail`` fraction of the run exceeds the median over the window just after warm-up by
less than ``--max-growth-mib`` MiB (and the fit over the post-warm-up samples has no material
slope). Writes JSON (and a PNG when matplotlib is installed).

    python benchmarks/soak.py --streams 64 --frames 500 --out docs/benchmarks/soak_cpu.json   (~10-20 min on 2 cores)
    python benchmarks/soak.py --streams 4 --frames 40 --out /tmp/soak_quick.json              (quick check)

Not a CI test.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from stac_backend.results import write_result
from stac_backend.loadgen.fleet import (
    FleetConfig,
    plot as plot_fleet,
    process_tree_rss,
    run_fleet,
    scrape_metrics,
    start_local_server,
)

MiB = 1 << 20


class Sampler(threading.Thread):
    def __init__(self, pid: int, metrics_url: str, interval: float, progress, log_path: Path | None = None):
        super().__init__(daemon=True)
        self.log_path = log_path
        self.pid, self.metrics_url, self.interval, self.progress = pid, metrics_url, interval, progress
        self.samples: list[dict] = []
        self.stop_event = threading.Event()
        self.t0 = time.perf_counter()

    def sample(self) -> None:
        row = {"t": round(time.perf_counter() - self.t0, 3), "rss_bytes": process_tree_rss(self.pid),
               "frames_done": self.progress()}
        try:
            m = scrape_metrics(self.metrics_url, timeout=5)
            row.update(active_streams=m.get("stac_active_streams", 0.0), cache_bytes=m.get("stac_cache_bytes", 0.0),
                       failed_requests=m.get("stac_failed_requests_total", 0.0))
        except OSError:
            pass
        self.samples.append(row)
        if self.log_path is not None:  # survives an interrupted run
            with open(self.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)


def analyse(samples: list[dict], total_frames: int, warmup_fraction: float, tail_fraction: float) -> dict:
    """Warm-up ends when ``warmup_fraction`` of the frames are done; compare that window to the tail."""
    t = np.array([s["t"] for s in samples])
    rss = np.array([s["rss_bytes"] for s in samples], dtype=np.float64)
    done = np.array([s["frames_done"] for s in samples], dtype=np.float64)
    warm_idx = int(np.argmax(done >= warmup_fraction * total_frames)) if (done >= warmup_fraction * total_frames).any() else 0
    running = np.nonzero(done < total_frames)[0]
    end_idx = int(running[-1]) + 1 if len(running) else len(samples)
    span = max(1, end_idx - warm_idx)
    tail_n = max(3, int(round(tail_fraction * span)))
    warm_window = rss[warm_idx : warm_idx + tail_n]
    tail_window = rss[max(warm_idx, end_idx - tail_n) : end_idx]
    post_t, post_rss = t[warm_idx:end_idx], rss[warm_idx:end_idx]
    slope = float(np.polyfit(post_t, post_rss, 1)[0]) if len(post_t) >= 3 else 0.0
    return {
        "samples": len(samples),
        "warmup_ends_s": float(t[warm_idx]) if len(t) else 0.0,
        "rss_start_mib": round(rss[0] / MiB, 1),
        "rss_after_warmup_mib": round(float(np.median(warm_window)) / MiB, 1),
        "rss_tail_mib": round(float(np.median(tail_window)) / MiB, 1),
        "rss_peak_mib": round(float(rss.max()) / MiB, 1),
        "rss_after_run_mib": round(rss[-1] / MiB, 1),
        "growth_after_warmup_mib": round((float(np.median(tail_window)) - float(np.median(warm_window))) / MiB, 1),
        "slope_after_warmup_mib_per_min": round(slope * 60 / MiB, 2),
    }


def plot_samples(data: dict, path: Path) -> bool:
    """Server-tree RSS and frames done over time, from a soak JSON's samples (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    samples, memory = data["samples"], data["memory"]
    t = [s["t"] for s in samples]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(t, [s["rss_bytes"] / MiB for s in samples], label="server tree RSS (tritonserver + stub)")
    if any("cache_bytes" in s for s in samples):
        ax.plot(t, [s.get("cache_bytes", 0) / MiB for s in samples], label="stac_cache_bytes (all streams)")
    ax.axvline(memory["warmup_ends_s"], color="grey", ls=":", label="end of warm-up")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax2 = ax.twinx()
    ax2.plot(t, [s["frames_done"] for s in samples], color="C2", alpha=0.4, label="frames done")
    ax2.set_ylabel("frames done")
    a = data["aggregate"]
    ax.set_title(f"soak: {a['streams']} streams, {a['frames']} frames, {a['errors']} errors; RSS growth after warm-up "
                 f"{memory['growth_after_warmup_mib']:+.1f} MiB")
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--frames", type=int, default=500)
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--height", type=int, default=56)
    p.add_argument("--width", type=int, default=84)
    p.add_argument("--fps", type=float, default=None, help="per-stream pacing (default: as fast as possible)")
    p.add_argument("--source", choices=("synthetic", "random"), default="synthetic")
    p.add_argument("--scene-frames", type=int, default=48, help="synthetic frames rendered per stream (then replayed)")
    p.add_argument("--policy", default="stac")
    p.add_argument("--sample-interval", type=float, default=2.0)
    p.add_argument("--warmup", type=float, default=0.15, help="fraction of frames counted as warm-up")
    p.add_argument("--tail", type=float, default=0.15, help="fraction of the post-warm-up run compared")
    p.add_argument("--max-growth-mib", type=float, default=64.0)
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/soak_cpu.json"))
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in the server's stub (OMP_NUM_THREADS); more than the free cores oversubscribes")
    p.add_argument("--replot", type=Path, default=None, help="only draw --plot from an existing soak JSON")
    args = p.parse_args()
    if args.replot:
        return 0 if plot_samples(json.loads(args.replot.read_text()), args.plot or args.replot.with_suffix(".png")) else 1

    import torch

    torch.set_num_threads(1)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="stac-soak-"))
    server = start_local_server(workdir, cache_config={"policy": args.policy, "chunk": args.chunk},
                                max_streams=max(64, args.streams), threads=args.threads)
    # SIGTERM (e.g. `kill`) stops the run through the finally blocks: server stopped, samples kept.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    print(f"[soak] server ready in {server.startup_seconds:.1f} s at {server.grpc_url} (log {workdir}/tritonserver.log)",
          file=sys.stderr)
    config = FleetConfig(url=server.grpc_url, streams=args.streams, frames=args.frames, chunk=args.chunk,
                         height=args.height, width=args.width, fps=args.fps, source=args.source,
                         scene_frames=args.scene_frames, first_stream_id=10_000, max_restarts=0,
                         request_timeout_s=600.0, metrics_urls=[server.metrics_url], progress_interval_s=10.0)
    done_by: dict[int, int] = {}

    def count(record, _out):  # on_chunk: runs on the fleet's event loop after every answered chunk
        done_by[record.stream_id] = record.frames_done

    def progress() -> int:
        return sum(done_by.values())

    from stac_backend.loadgen.fleet import make_frames

    # Frames are made before the clock starts.
    frames = {sid: make_frames(config.seed + k, config.frames, config.height, config.width, config.source,
                               config.scene_frames) for k, sid in enumerate(config.ids())}
    print(f"[soak] frames ready: {args.streams} streams x {args.frames}", file=sys.stderr)
    sampler = Sampler(server.pid, server.metrics_url, args.sample_interval, progress, workdir / "samples.jsonl")
    sampler.sample()  # idle baseline
    sampler.start()
    try:
        result = run_fleet(config, frames=frames, on_chunk=count)
    finally:
        time.sleep(args.sample_interval)
        sampler.stop_event.set()
        sampler.join()
        final_metrics = scrape_metrics(server.metrics_url)
        server.stop()
    total = args.streams * args.frames
    memory = analyse(sampler.samples, total, args.warmup, args.tail)
    flat = memory["growth_after_warmup_mib"] < args.max_growth_mib
    print(result.table())
    data = result.to_json()
    data["kind"] = "soak"
    for s in data["streams"]:  # 64 rows of detail are in the aggregate; keep the per-stream summary short
        s.pop("error_messages", None) if not s["errors"] else None
    data["memory"] = memory | {"max_growth_mib": args.max_growth_mib, "flat": flat}
    data["server_after_run"] = {k: final_metrics.get(k, 0.0) for k in (
        "stac_active_streams", "stac_cache_bytes", "stac_streams_started_total", "stac_streams_ended_total",
        "stac_streams_expired_total", "stac_failed_requests_total", "stac_frames_total")}
    data["samples"] = sampler.samples
    data["config"]["server_threads"] = args.threads
    data["passed"] = bool(flat and result.errors == 0 and data["aggregate"]["frames"] == total)
    write_result(args.out, data, "soak", "cpu")
    print(json.dumps({"aggregate": data["aggregate"], "memory": data["memory"], "passed": data["passed"]}, indent=1))
    if args.plot:
        if not plot_samples(data, args.plot):
            print("[soak] --plot skipped: matplotlib is not installed", file=sys.stderr)
        else:
            plot_fleet(result, args.plot.with_name(args.plot.stem + "_latency.png"))
    return 0 if data["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
