"""perf_analyzer concurrency sweep for the stac model -> docs/benchmarks/perf_<device>.{csv,json} (+ .png).

A thin front end for ``stac perf sweep`` (stac_backend/loadgen/perf.py) with the settings used for
the checked-in CPU numbers: a local tritonserver (tiny model, CPU, one torch thread), 4 streams of
real synthetic frames (56x84, chunks of 4, 8 requests per sequence), serial sequences, concurrency
1..4, 5 s measurement windows. The JSON gets the run record every benchmark result carries.

    python benchmarks/perf_sweep.py                                   # CPU, local server
    python benchmarks/perf_sweep.py --server HOST:8001 --metrics-url http://HOST:8002/metrics \\
        --size 392x518 --concurrency 1:8 --out docs/benchmarks/perf_h100   # a running GPU server

Needs perf_analyzer: ``stac perf install`` (+ ``apt-get install libb64-0d`` on Debian/Ubuntu).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from stac_backend.results import write_result
from stac_backend.loadgen.perf import main

DEFAULTS = ["sweep", "--concurrency", "1:4", "--streams", "4", "--steps", "8", "--size", "56x84",
            "--measurement-interval", "5000", "--out", "docs/benchmarks/perf_cpu", "--plot"]

if __name__ == "__main__":
    args = sys.argv[1:]
    local = "--server" not in args
    if local and "--local" not in args:
        args = ["--local", *args]
    # later options win in argparse: the defaults first, the caller's after
    argv = DEFAULTS[:1] + DEFAULTS[1:] + args
    code = main(argv)
    out = Path(argv[len(argv) - 1 - argv[::-1].index("--out") + 1]).with_suffix(".json")
    if out.is_file():
        device = argv[argv.index("--device") + 1] if "--device" in argv else ("cpu" if local else None)
        write_result(out, json.loads(out.read_text()), "perf", device)
    sys.exit(code)
