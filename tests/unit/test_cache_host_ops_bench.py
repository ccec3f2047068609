"""benchmarks/cache_host_ops.py: the host operations of a batched stac step, per hot store."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import load_script

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "cache_host_ops.py"


def load():
    return load_script(BENCH, "cache_host_ops_bench")


def test_counts_both_stores_and_the_slot_store_launches_fewer(tmp_path):
    """At 8 layers the slot store (one arena per stream: all layers staged, taken and written at once)
    issues fewer kernel-launching operations per step than the compact store (per-layer joins and
    gathers); a change that brings back per-layer work in the slot store's end of step fails here."""
    out = tmp_path / "ops.json"
    assert load().main(["--depth", "8", "--streams", "2", "--warm-steps", "6", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["run"]["benchmark"] == "cache_host_ops" and data["run"]["device"] == "cpu"
    compact, slots = data["stores"]["compact"], data["stores"]["slots"]
    for row in (compact, slots):
        assert 0 < row["ops_without_views"] < row["ops"] == sum(row["by_op"].values())
    assert slots["ops_without_views"] < compact["ops_without_views"]
