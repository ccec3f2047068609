"""perf_analyzer concurrency sweep for the stac model -> docs/benchmarks/perf_<tag>.{csv,json} (+ .png).

A thin front end for ``stac perf sweep`` (stac_backend/loadgen/perf.py) with the settings used for
the checked-in CPU numbers: a local tritonserver (tiny model, CPU, one torch thread), 4 streams of
real synthetic frames (56x84, chunks of 4, 8 requests per sequence), serial sequences, concurrency
1..4, 5 s measurement windows.

    python benchmarks/perf_sweep.py                                   # CPU, local server
    python benchmarks/perf_sweep.py --server HOST:8001 --metrics-url http://HOST:8002/metrics \\
        --size 392x518 --concurrency 1:8 --out docs/benchmarks/perf_gpu   # a running GPU server (#7)

Needs perf_analyzer: ``stac perf install`` (+ ``apt-get install libb64-0d`` on Debian/Ubuntu).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stac_backend.loadgen.perf import main  # noqa: E402

DEFAULTS = ["sweep", "--concurrency", "1:4", "--streams", "4", "--steps", "8", "--size", "56x84",
            "--measurement-interval", "5000", "--out", "docs/benchmarks/perf_cpu", "--plot"]

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--server" not in args and "--local" not in args:
        args = ["--local", *args]
    # later options win in argparse: the defaults first, the caller's after
    sys.exit(main(DEFAULTS[:1] + DEFAULTS[1:] + args))
