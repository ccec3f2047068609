"""Load generation: a fleet of concurrent gRPC camera streams (``fleet``) and perf_analyzer
helpers (``perf``: install, sequence input data, concurrency sweeps)."""
