"""benchmarks/engine_step.py on the CPU with the tiny model (variants run in this process, Triton
skipped), and the FLOPs per frame of benchmarks/step_flops.py against torch's FLOP counter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import load_script

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    return load_script(ROOT / "benchmarks" / f"{name}.py", f"{name}_bench")


def _counted(fn) -> int:
    """FLOPs torch counts for ``fn`` (attention through the math kernel, which it counts)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def test_flops_match_torchs_counter_on_the_tiny_model():
    flops = _load("step_flops")
    from stac_backend.model import config_with, get_preset
    from stac_backend.model.dpt_head import DPTHead
    from stac_backend.model.layers import Block
    from stac_backend.model.patch_embed import build_patch_embed

    config, (h, w) = get_preset("tiny"), (56, 84)
    tokens, width = config.tokens_per_frame(h, w), 2 * config.embed_dim
    layers = [torch.randn(1, 1, tokens, width) for _ in range(config.depth)]
    for output_dim in (2, 4):
        head = DPTHead(width, output_dim=output_dim, features=config.dpt_features, out_channels=config.dpt_out_channels,
                       intermediate_layer_idx=config.dpt_intermediate_layer_idx)
        assert _counted(lambda: head(layers, (h, w), config.patch_start_idx)) == flops.dpt_head_flops(config, h, w, output_dim)
    block = Block(config.embed_dim, config.num_heads, config.mlp_ratio, qk_norm=config.qk_norm)
    x = torch.randn(1, tokens, config.embed_dim)
    assert _counted(lambda: block(x)) == (flops.block_dense_flops(tokens, config.embed_dim, config.mlp_ratio)
                                          + flops.attention_flops(tokens, tokens, config.embed_dim))
    images = torch.randn(1, 3, h, w)
    for kind in ("conv", "dinov2_vits14_reg"):
        c = config if kind == "conv" else config_with(config, patch_embed=kind, embed_dim=384, num_heads=6)
        embed = build_patch_embed(kind, c.img_size, c.patch_size, c.num_register_tokens, c.embed_dim)
        assert _counted(lambda: embed(images)) == flops.patch_embed_flops(c, h, w)


def test_vggt_1b_frame_at_the_stac_defaults():
    flops = _load("step_flops")
    from stac_backend.cache import CacheConfig
    from stac_backend.model import get_preset

    assert flops.working_set_frames(CacheConfig(policy="stac")) == 13  # chunk 4 + pinned 1 + window 4 + hh 2 + retrieval 2
    assert flops.working_set_frames(CacheConfig(policy="window")) == 8
    assert flops.working_set_frames(CacheConfig(policy="full")) is None
    config = get_preset("vggt-1b")
    frame = flops.frame_flops(config, 392, 518, 13)
    tokens, c = 1041, 1024  # 5 + 28 x 37 tokens per frame
    assert config.tokens_per_frame(392, 518) == tokens
    assert frame["global_attention"] == 24 * 4 * tokens * 13 * tokens * c  # ~1.39 TFLOP
    assert frame["key_mass"] * 2 == frame["global_attention"]
    assert frame["global_blocks_dense"] == 24 * 2 * tokens * 12 * c * c
    assert frame["total"] == sum(frame[k] for k in flops.COMPONENTS)
    assert 4.4e12 < frame["total"] < 4.9e12  # ~5 TFLOP per frame
    # the attention part grows with the working set, nothing else does
    wider = flops.frame_flops(config, 392, 518, 26)
    assert wider["global_attention"] == 2 * frame["global_attention"] and wider["dpt_heads"] == frame["dpt_heads"]


def test_roofline_arithmetic():
    flops = _load("step_flops")
    frame = {k: 0 for k in flops.COMPONENTS} | {"global_attention": 3e12, "dpt_heads": 2e12, "total": 5e12}
    row = flops.roofline(frame, 100.0, {"spec_bf16": 1000.0, "measured_gemm": 800.0, "unknown": None})
    assert row["achieved_tflops"] == pytest.approx(500.0)
    assert row["share_of_spec_bf16"] == pytest.approx(0.5) and row["share_of_measured_gemm"] == pytest.approx(0.625)
    assert row["frames_per_second_at_spec_bf16"] == pytest.approx(200.0)
    assert "share_of_unknown" not in row
    assert flops.roofline(frame, None, {"spec_bf16": 1000.0})["share_of_spec_bf16"] is None
    table = {r["component"]: r for r in flops.component_table(frame, {"measured_gemm": 800.0, "unknown": None})}
    assert list(table) == list(flops.COMPONENTS)
    assert table["global_attention"]["ms_per_frame_at_measured_gemm"] == pytest.approx(3.75)
    assert table["global_attention"]["share"] == pytest.approx(0.6) and not table["global_attention"]["cache_free"]
    assert table["dpt_heads"]["cache_free"] and "ms_per_frame_at_unknown" not in table["dpt_heads"]


def test_switches_go_where_a_keyword_takes_them():
    bench = _load("engine_step")

    def build(preset, compile=False):  # noqa: A002 - the switch's name
        return preset

    kwargs, applied = bench.apply_switches({"compile": True, "fp8": False, "window": 8},
                                           {"build_model": build, "CacheConfig": bench.CacheConfig})
    assert kwargs == {"build_model": {"compile": True}, "CacheConfig": {"window": 8}}
    assert applied == {"compile": "build_model(compile=True)", "fp8": "environment only", "window": "CacheConfig(window=8)"}
    # the baseline turns every new feature off, through the environment too
    base = bench.VARIANTS["baseline"]
    assert not any(base["switches"].values())
    assert all(base["env"][k] == "0" for k in ("STAC_COMPILE", "STAC_FP8"))


def test_latency_summary():
    bench = _load("engine_step")
    samples = [{"frame": f, "ms_per_frame": ms} for f, ms in ((4, 50.0), (12, 10.0), (120, 11.0), (200, 13.0), (1000, 12.0))]
    summary = bench.latency_summary(samples, 1000)
    assert summary["median_ms_per_frame_100_on"] == 12.0
    assert summary["first_sample"]["frame"] == 12 and summary["last_over_frame10"] == pytest.approx(1.2)
    assert bench.latency_summary([], 1000)["last_over_frame10"] is None


def test_tiny_run_writes_variants_side_by_side(tmp_path, monkeypatch):
    bench = _load("engine_step")
    out = tmp_path / "engine_step_cpu.json"
    ran = []

    def in_process(args, phase, variant, spec, share_s):
        """The phase's own command line, run here (a subprocess costs a torch import each)."""
        part_out = tmp_path / f"{variant}.json"
        command = bench.phase_command(args, phase, variant, spec, share_s, part_out)
        ran.append((phase, variant, spec["env"]))
        assert bench.main(command[2:]) == 0
        return {**json.loads(part_out.read_text()), "process_status": "ok"}

    monkeypatch.setattr(bench, "run_phase", in_process)
    # the variants' machinery, not Inductor (minutes on a CPU): the new engine's switches, compile off
    monkeypatch.setattr(bench, "VARIANTS", {"baseline": bench.VARIANTS["baseline"],
                                            "new": {"switches": {"compile": False, "fp8": False, "no_such_switch": True},
                                                    "env": {"STAC_COMPILE": "0"}, "args": []}})
    # a machine without Triton: the part is skipped with the reason, the rest runs
    monkeypatch.setattr(bench, "triton_unavailable", lambda: "no tritonserver: nvidia-pytriton is not installed")
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--height", "28", "--width", "42",
                       "--streams", "1,2", "--warmup-frames", "4", "--timed-frames", "4", "--warmup-batch", "2",
                       "--latency-frames", "16", "--latency-sample-every", "2", "--latency-reserve-s", "0",
                       "--time-budget-s", "600", "--out", str(out)]) == 0
    assert [r[:2] for r in ran] == [("variant", "baseline"), ("variant", "new")]
    data = json.loads(out.read_text())
    assert data["run"]["benchmark"] == "engine_step" and data["device"] == "cpu" and data["image_hw"] == [28, 42]
    assert set(data["variants"]) == {"baseline", "new"}
    assert data["triton"] == {"variant": "new", "streams": [8, 32], "rows": [],
                              "skipped": "no tritonserver: nvidia-pytriton is not installed"}
    flops = data["flops_per_frame"]
    assert flops["working_set_frames"] == 13 and flops["total"] > 0
    assert data["peak_tflops"]["spec_bf16"] is None and data["peak_tflops"]["measured_gemm"] > 0
    for name, part in data["variants"].items():
        assert part["switches_applied"]["compile"] == "build_model(compile=False)"
        assert part["switches_applied"]["fp8"] == "build_model(fp8=False)"
        if name == "new":
            assert part["switches_applied"]["no_such_switch"] == "environment only"
        assert [r["streams"] for r in part["rows"]] == [1, 2]
        for row in part["rows"]:
            assert row["status"] == "ok", row
            assert row["aggregate_frames_per_second"] > 0 and row["cache_bytes_per_stream"] > 0
        latency = part["latency"]
        assert latency["status"] == "ok" and latency["frames"] == 16
        assert [s["frame"] for s in latency["samples"]] == [4, 12, 16]  # every 2nd step, frame 10's, the last
        assert latency["last_over_frame10"] > 0
        roof = data["roofline"][name]["streams_2"]
        assert roof["achieved_tflops"] == pytest.approx(flops["total"] * part["rows"][1]["aggregate_frames_per_second"] / 1e12)
        assert roof["share_of_measured_gemm"] == pytest.approx(roof["achieved_tflops"] / data["peak_tflops"]["measured_gemm"])
    assert data["targets"]["variant"] == "new"
    assert data["targets"]["min_frames_per_second_8_to_32_streams"] == {"measured": None, "target": 90.0, "margin": None}
    assert [r["component"] for r in data["flops_by_component"]] == list(_load("step_flops").COMPONENTS)
    table = {entry["streams"]: entry for entry in data["side_by_side"]}
    assert sorted(table) == [1, 2]
    assert set(table[2]["frames_per_second"]) == {"baseline", "new"} and table[2]["new_over_baseline"] > 0


def test_a_named_run_records_its_name_and_cache_overrides(tmp_path, monkeypatch):
    """--benchmark names a variant of the run (e.g. the store A/B) so that it does not take the place
    of engine_step's own file; the cache overrides reach the recorded config and every phase."""
    bench = _load("engine_step")
    seen = []
    monkeypatch.setattr(bench, "run_phase", lambda args, phase, variant, spec, share_s:
                        seen.append(args.cache_overrides) or {"rows": [], "latency": {}, "process_status": "ok"})
    out = tmp_path / "store.json"
    assert bench.main(["--benchmark", "engine_step_store", "--variants", "new", "--preset", "tiny", "--device", "cpu",
                       "--dtype", "float32", "--height", "28", "--width", "42", "--streams", "1", "--gemm-size", "64",
                       "--triton-streams", "none", "--cache-overrides", '{"store": "slots"}', "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["run"]["benchmark"] == data["benchmark"] == "engine_step_store"
    assert data["cache_config"]["store"] == "slots" and seen == ['{"store": "slots"}']


def test_a_spent_budget_cuts_rows_cleanly(tmp_path):
    """The variant process itself, with no time: every row skipped, still a file."""
    bench = _load("engine_step")
    part = tmp_path / "part.json"
    assert bench.main(["--phase", "variant", "--variant", "baseline", "--variant-spec", json.dumps(bench.VARIANTS["baseline"]),
                       "--deadline-s", "0", "--part-out", str(part), "--preset", "tiny", "--device", "cpu",
                       "--dtype", "float32", "--height", "28", "--width", "42", "--streams", "1,8", "--warmup-batch", "1",
                       "--latency-frames", "8"]) == 0
    data = json.loads(part.read_text())
    assert [r["status"].startswith("skipped: the variant's time share") for r in data["rows"]] == [True, True]
    # the skip says what spent the share: the warm-up, whose compile is slow on a cold cache
    assert all(f"the warm-up took {data['warmup']['seconds']:.0f} s" in r["status"] for r in data["rows"])
    assert data["latency"]["status"].startswith("cut at frame 0") and data["latency"]["samples"] == []


def test_targets_and_their_margins():
    bench = _load("engine_step")
    gib = bench.GIB
    rows = [{"streams": n, "status": "ok", "aggregate_frames_per_second": fps, "peak_reserved_bytes": 70 * gib}
            for n, fps in ((8, 100.0), (16, 95.0), (32, 90.0), (48, 88.0))]
    report = {"variants": {"new": {"rows": rows, "latency": {"median_ms_per_frame_100_on": 12.0, "last_over_frame10": 1.5}}},
              "triton": {"rows": [{"streams": 8, "triton_over_engine": 0.95}, {"streams": 32, "triton_over_engine": 0.81}]}}
    t = bench.targets(report, "new")
    assert t["min_frames_per_second_8_to_32_streams"] == {"measured": 90.0, "target": 90.0, "margin": 1.0}
    assert t["peak_reserved_gib_48_streams"]["margin"] == pytest.approx(78 / 70)
    assert t["one_stream_median_ms_per_frame_100_to_1000"]["margin"] == pytest.approx(1.25)
    assert t["one_stream_frame1000_over_frame10"]["margin"] == pytest.approx(0.8)
    assert t["triton_over_engine_min_8_and_32"]["measured"] == 0.81
    assert bench.targets({"variants": {}, "triton": {"rows": []}}, "new")["peak_reserved_gib_48_streams"]["measured"] is None
