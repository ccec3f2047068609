"""Fused attention-with-key-mass kernel vs torch SDPA (no mass) vs the blockwise reference, on the
shapes of a vggt-1b streaming step (16 heads x 64 dims, a chunk of 4 frames x 1041 tokens as
queries). Writes JSON. Needs a CUDA GPU and OpenAI Triton.

    python benchmarks/kernel_attention.py --out docs/benchmarks/kernel_attention_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from stac_backend.cache.attention import attention_with_key_mass
from stac_backend.kernels.attention_mass import (
    FORWARD_EXPS, MASS_METHODS, fused_attention_with_key_mass, hybrid_attention_with_key_mass, resolve_forward_exp,
    resolve_mass_method)
from stac_backend.results import write_result


def bench(fn, warmup=3, reps=10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def sdpa_with_key_bias(q, k, v, bias):
    """torch SDPA doing the same attention as the fused kernel: the per-key bias (log C of merged
    pivots; -inf for padding) as an additive mask broadcast over the queries. PyTorch's kernels want
    the mask's head stride 8-aligned, so the bias lives in a padded buffer and is sliced."""
    B, H, M, _ = q.shape
    N = k.shape[2]
    padded = torch.zeros(B, H, 1, (N + 7) // 8 * 8, device=q.device, dtype=q.dtype)
    padded[..., :N] = bias[:, :, None, :].to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=padded[..., :N].expand(B, H, M, N))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--frames", default="13,24,50,100,200", help="key counts in frames of 1041 tokens")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--tune", action="store_true", help="first time a few block/warp configurations")
    p.add_argument("--tune-mass-method", default="auto", help="--tune: the key-mass method the mass grid runs")
    args = p.parse_args()
    tokens, H, D = 1041, 16, 64
    M = 4 * tokens
    rows = []
    tuning = []
    if args.tune:
        q = torch.randn(1, H, M, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, H, 13 * tokens, D, device="cuda", dtype=torch.bfloat16)
        bias = torch.zeros(1, H, k.shape[2], device="cuda")
        forward_grid = [(bm, bn, w, st) for bm, bn, w in [(64, 64, 4), (128, 64, 4), (128, 64, 8), (128, 128, 8), (128, 32, 4), (64, 128, 4)]
                        for st in (2, 3, 4)]
        mass_grid = [(bm, bn, w, st) for bm, bn, w in [(128, 64, 4), (64, 128, 4), (128, 128, 8), (64, 64, 4), (128, 128, 4),
                                                       (64, 128, 8), (32, 128, 4), (64, 256, 8)]
                     for st in (2, 3, 4)]
        base = bench(lambda: fused_attention_with_key_mass(q, k, k, bias, need_mass=False))
        for kind, grid in (("forward", forward_grid), ("mass", mass_grid)):
            for bm, bn, w, st in grid:
                try:
                    if kind == "forward":
                        t = bench(lambda: fused_attention_with_key_mass(q, k, k, bias, need_mass=False, block_m=bm, block_n=bn,
                                                                        num_warps=w, num_stages=st))
                    else:
                        t = bench(lambda: fused_attention_with_key_mass(q, k, k, bias, mass_block_m=bm, mass_block_n=bn,
                                                                        mass_num_warps=w, mass_num_stages=st,
                                                                        mass_method=args.tune_mass_method)) - base
                except Exception as exc:  # noqa: BLE001 - a config may not compile (shared memory)
                    tuning.append({"kernel": kind, "config": [bm, bn, w, st], "error": str(exc)[:200]})
                    continue
                tuning.append({"kernel": kind, "config": [bm, bn, w, st], "ms": t,
                               **({"mass_method": args.tune_mass_method} if kind == "mass" else {})})
                print(json.dumps(tuning[-1]), flush=True)
        del q, k
    for B in [int(b) for b in args.batch.split(",")]:
        for frames in [int(f) for f in args.frames.split(",")]:
            N = frames * tokens
            if B * H * N * D * 2 * 2 > 30e9:
                continue
            q = torch.randn(B, H, M, D, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
            bias = torch.zeros(B, H, N, device="cuda")
            sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v))
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # the engine's backend (cuDNN is off there by default)
                sdpa_flash = bench(lambda: F.scaled_dot_product_attention(q, k, v))
            try:  # SDPA given our per-key bias (the mass is still not computed)
                sdpa_bias = bench(lambda: sdpa_with_key_bias(q, k, v, bias))
            except Exception as exc:  # noqa: BLE001 - a backend may refuse the mask layout
                sdpa_bias = None
                print(f"sdpa with key bias failed: {str(exc)[:200]}", file=sys.stderr)
            fused = bench(lambda: fused_attention_with_key_mass(q, k, v, bias))
            by_method = {m: bench(lambda: fused_attention_with_key_mass(q, k, v, bias, mass_method=m)) for m in MASS_METHODS}
            fused_no_mass = bench(lambda: fused_attention_with_key_mass(q, k, v, bias, need_mass=False))
            no_mass_by_exp = {e: bench(lambda: fused_attention_with_key_mass(q, k, v, bias, need_mass=False, forward_exp=e))
                              for e in FORWARD_EXPS}
            try:
                hybrid = bench(lambda: hybrid_attention_with_key_mass(q, k, v, None))
                hybrid_bias = bench(lambda: hybrid_attention_with_key_mass(q, k, v, bias))
                ho, hm = hybrid_attention_with_key_mass(q[:, :2], k[:, :2], v[:, :2], bias[:, :2])
                fo, fm = fused_attention_with_key_mass(q[:, :2], k[:, :2], v[:, :2], bias[:, :2])
                hybrid_check = {"out_max_diff": (ho.float() - fo.float()).abs().max().item(),
                                "mass_max_rel_diff": ((hm - fm).abs().max() / M).item()}
            except Exception as exc:  # noqa: BLE001 - private aten ops may be missing
                hybrid = hybrid_bias = None
                hybrid_check = {"error": str(exc)[:300]}
            reference = bench(lambda: attention_with_key_mass(q, k, v, key_bias=bias), warmup=1, reps=2) if N <= 60000 else None
            flops = 4 * B * H * M * N * D  # q.k and p.v of plain attention
            row = {"batch": B, "queries": M, "keys": N, "key_frames": frames, "sdpa_ms": sdpa, "sdpa_flash_ms": sdpa_flash,
                   "sdpa_key_bias_ms": sdpa_bias,
                   "fused_with_mass_ms": fused, "mass_method": resolve_mass_method("auto", q),
                   "fused_with_mass_ms_by_method": by_method,
                   "fused_over_sdpa_by_method": {m: t / sdpa for m, t in by_method.items()},
                   "fused_no_mass_ms": fused_no_mass, "forward_exp": resolve_forward_exp("auto", q),
                   "fused_no_mass_ms_by_forward_exp": no_mass_by_exp, "reference_blockwise_ms": reference,
                   "hybrid_sdpa_lse_plus_mass_ms": hybrid, "hybrid_with_bias_ms": hybrid_bias, "hybrid_check": hybrid_check,
                   "hybrid_over_sdpa": hybrid / sdpa if hybrid else None,
                   "fused_over_sdpa": fused / sdpa, "sdpa_tflops": flops / sdpa / 1e9, "fused_tflops_equiv": flops / fused / 1e9}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del q, k, v
            torch.cuda.empty_cache()
    report = {"benchmark": "kernel_attention", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "heads": H, "head_dim": D, "dtype": "bfloat16", "tuning": tuning, "rows": rows}
    write_result(args.out, report, "kernel_tuning" if args.tune else "kernel_attention", "cuda")
    return 0


if __name__ == "__main__":
    sys.exit(main())
