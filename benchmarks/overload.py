"""Overload: twice the admitted load offered to a local tritonserver for a long time (tiny model, CPU).

The server admits ``--admitted`` streams (MAX_STREAMS). ``--factor`` times as many camera clients
(threads, one gRPC connection each) each run streams back to back: a START with a random id and its
own key, then paced chunks (``--fps``, chunks of ``--chunk``) up to ``--stream-frames`` frames, then
END. A START refused with UNAVAILABLE ("retry later") is retried after ``--retry-s`` with a new id.
What must hold: admitted streams keep their latency (per-minute percentiles stay where they were),
the others are refused at once with UNAVAILABLE, no admitted stream is dropped mid-sequence, and
the server's memory (process tree RSS, /dev/shm) stays flat.

    python benchmarks/overload.py --duration 600 --out docs/benchmarks/overload_cpu.json   (2 min at the admitted load, then 10 min at 2x)
    python benchmarks/overload.py --baseline-s 20 --duration 30 --out /tmp/overload_quick.json   (quick check)

Not a CI test.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from stac_backend.client import new_stream_id, new_stream_key
from stac_backend.loadgen.fleet import environment, process_tree_rss, scrape_metrics
from stac_backend.results import write_result
from stac_backend.serving.repository import local_server
from stac_backend.serving.settings import ServeSettings

MiB = 1 << 20


def percentiles(values, digits=1):
    if not values:
        return {}
    a = np.asarray(values)
    return {k: round(float(np.percentile(a, q)), digits) for k, q in (("p50", 50), ("p95", 95), ("p99", 99))} | {
        "max": round(float(a.max()), digits), "n": int(a.size)}


class Camera(threading.Thread):
    """One camera client: streams back to back until ``stop``."""

    def __init__(self, index: int, url: str, args, stop: threading.Event, t0: float):
        super().__init__(daemon=True, name=f"camera-{index}")
        import tritonclient.grpc as grpcclient

        self.grpc, self.args, self.stop, self.t0 = grpcclient, args, stop, t0
        self.client = grpcclient.InferenceServerClient(url)
        rng = np.random.default_rng(index)
        self.frames = rng.integers(0, 256, (args.chunk, 3, args.height, args.width), dtype=np.uint8)[None]
        self.latencies: list[tuple[float, float]] = []  # (time since start, ms) of admitted requests
        self.refusals_ms: list[float] = []  # START refused with UNAVAILABLE: how long the answer took
        self.other_start_errors: list[str] = []
        self.dropped: list[str] = []  # an admitted stream's request failed mid-sequence
        self.streams_done = 0
        self.streams_admitted = 0

    def request(self, cid, key, start, end):
        inputs = [self.grpc.InferInput("FRAMES", list(self.frames.shape), "UINT8"),
                  self.grpc.InferInput("STREAM_KEY", [1, 2], "INT64")]
        inputs[0].set_data_from_numpy(self.frames)
        inputs[1].set_data_from_numpy(key)
        outputs = [self.grpc.InferRequestedOutput("FRAME_INDEX")]
        return self.client.infer("stac", inputs, outputs=outputs, sequence_id=cid, sequence_start=start,
                                 sequence_end=end, client_timeout=self.args.timeout_s)

    def run(self):
        a = self.args
        chunks = a.stream_frames // a.chunk
        period = a.chunk / a.fps
        while not self.stop.is_set():
            cid, key = new_stream_id(), new_stream_key()
            sent = time.perf_counter()
            try:
                self.request(cid, key, True, False)
            except self.grpc.InferenceServerException as exc:
                ms = (time.perf_counter() - sent) * 1e3
                if exc.status() == "StatusCode.UNAVAILABLE":
                    self.refusals_ms.append(ms)
                else:
                    self.other_start_errors.append(f"{exc.status()} {exc.message()}"[:200])
                self.stop.wait(a.retry_s)
                continue
            self.streams_admitted += 1
            self.latencies.append((sent - self.t0, (time.perf_counter() - sent) * 1e3))
            next_send = sent + period
            for i in range(1, chunks):
                last = i == chunks - 1 or self.stop.is_set()
                delay = next_send - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                next_send += period
                sent = time.perf_counter()
                try:
                    self.request(cid, key, False, last)
                except self.grpc.InferenceServerException as exc:
                    self.dropped.append(f"chunk {i}: {exc.status()} {exc.message()}"[:200])
                    break
                self.latencies.append((sent - self.t0, (time.perf_counter() - sent) * 1e3))
                if last:
                    self.streams_done += 1
                    break

    def close(self):
        self.client.close()


def shm_bytes(prefix: str) -> int:
    return sum(p.stat().st_size for p in Path("/dev/shm").glob(prefix + "*"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of overload")
    p.add_argument("--baseline-s", type=float, default=120.0,
                   help="seconds at exactly the admitted load first (the latency to keep)")
    p.add_argument("--admitted", type=int, default=4, help="the server's stream limit (MAX_STREAMS)")
    p.add_argument("--factor", type=float, default=2.0, help="offered cameras = factor x admitted")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second of each camera")
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--stream-frames", type=int, default=64, help="frames per stream before its END")
    p.add_argument("--height", type=int, default=56)
    p.add_argument("--width", type=int, default=84)
    p.add_argument("--retry-s", type=float, default=1.0, help="wait after a refused START")
    p.add_argument("--timeout-s", type=float, default=30.0, help="client deadline per request")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    p.add_argument("--sample-s", type=float, default=10.0, help="memory sampling interval")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="stac-overload-"))
    settings = ServeSettings.on_device("cpu", preset="tiny", cache_config={"policy": "stac", "chunk": args.chunk},
                                       max_streams=args.admitted, frame_size=(args.height, args.width))
    server = local_server(settings, workdir, threads=args.threads)
    cameras_n = int(round(args.factor * args.admitted))
    stop = threading.Event()
    samples = []
    try:
        t0 = time.perf_counter()
        cameras = [Camera(i, server.grpc_url, args, stop, t0) for i in range(cameras_n)]
        for c in cameras[:args.admitted]:  # the admitted load alone first, then the rest join
            c.start()
            time.sleep(args.chunk / args.fps / args.admitted)  # spread the cameras over one chunk period
        started_rest = False
        end = args.baseline_s + args.duration
        while time.perf_counter() - t0 < end:
            if not started_rest and time.perf_counter() - t0 >= args.baseline_s:
                for c in cameras[args.admitted:]:
                    c.start()
                    time.sleep(args.chunk / args.fps / cameras_n)
                started_rest = True
            m = scrape_metrics(server.metrics_url, timeout=5)
            samples.append({"t": round(time.perf_counter() - t0, 1), "rss_mib": round(process_tree_rss(server.pid) / MiB, 1),
                            "shm_mib": round(shm_bytes(server.shm_prefix) / MiB, 1),
                            "active_streams": m.get("stac_active_streams", 0.0)})
            print(f"[overload] {samples[-1]}", flush=True)
            time.sleep(min(args.sample_s, max(0.0, end - (time.perf_counter() - t0))))
        stop.set()
        for c in cameras:
            if c.is_alive():
                c.join(args.timeout_s + 5)
        metrics = scrape_metrics(server.metrics_url, timeout=5)
    finally:
        stop.set()
        server.stop()

    latencies = [x for c in cameras for x in c.latencies]
    minutes = {}
    for t, ms in latencies:
        minutes.setdefault(int(t // 60), []).append(ms)
    warm = [s for s in samples if s["t"] >= 60] or samples
    settle = 10.0  # seconds after each phase starts that are left out of its percentiles
    baseline = [ms for t, ms in latencies if settle <= t < args.baseline_s]
    overload = [ms for t, ms in latencies if t >= args.baseline_s + settle]
    result = {
        "environment": environment(),
        "load": {
            "admitted_streams": args.admitted, "offered_cameras": cameras_n, "factor": args.factor,
            "fps_per_camera": args.fps, "chunk": args.chunk, "frames_per_stream": args.stream_frames,
            "frame_size": [args.height, args.width], "admitted_frames_per_s": args.admitted * args.fps,
            "offered_frames_per_s": cameras_n * args.fps, "duration_s": args.duration,
            "baseline_s": args.baseline_s,
            "server_threads": args.threads, "model": "tiny preset, random weights, stac cache, CPU",
        },
        "admitted_latency_ms": percentiles([ms for _, ms in latencies]),
        "admitted_latency_ms_baseline": percentiles(baseline),
        "admitted_latency_ms_overload": percentiles(overload),
        "admitted_latency_ms_by_minute": {str(k): percentiles(v) for k, v in sorted(minutes.items())},
        "refused_starts": len([r for c in cameras for r in c.refusals_ms]),
        "refusal_latency_ms": percentiles([r for c in cameras for r in c.refusals_ms]),
        "other_start_errors": [e for c in cameras for e in c.other_start_errors][:20],
        "streams_admitted": sum(c.streams_admitted for c in cameras),
        "streams_completed": sum(c.streams_done for c in cameras),
        "dropped_mid_sequence": [e for c in cameras for e in c.dropped][:20],
        "dropped_mid_sequence_count": sum(len(c.dropped) for c in cameras),
        "server_metrics": {k: v for k, v in metrics.items() if k.startswith("stac_")},
        "memory": {
            "rss_mib_after_first_minute": warm[0]["rss_mib"] if warm else None,
            "rss_mib_last": samples[-1]["rss_mib"] if samples else None,
            "rss_mib_max": max(s["rss_mib"] for s in samples) if samples else None,
            "shm_mib_max": max(s["shm_mib"] for s in samples) if samples else None,
            "shm_mib_last": samples[-1]["shm_mib"] if samples else None,
        },
        "samples": samples,
    }
    write_result(args.out, result, "overload", "cpu")
    summary = {k: result[k] for k in ("admitted_latency_ms_baseline", "admitted_latency_ms_overload", "refused_starts", "refusal_latency_ms",
                                      "streams_admitted", "streams_completed", "dropped_mid_sequence_count", "memory")}
    print(json.dumps(summary, indent=1))
    for c in cameras:
        c.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
