"""What the TensorRT Python plugins execute, checked on a CUDA GPU without TensorRT.

The plugins (stac_backend/graph/trt_plugins.py) hand TensorRT's CUDA buffers to the shared
``ops.*_impl`` functions (StacAttention: the engine's fused attention dispatch). This script runs
the functional step - the same ops, on CUDA tensors - for a 20-frame stream of the tiny model and
compares it with the torch engine on the same GPU, for full and stac; and checks the plugins'
attention dispatch against the reference attention.

    python export/check_gpu_ops.py            # needs a CUDA GPU; prints JSON, exit 1 on a mismatch
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    import torch

    from conftest import make_tiny_model
    from stac_backend.cache import CacheConfig
    from stac_backend.cache.attention import attention_with_key_mass
    from stac_backend.engine import Stream
    from stac_backend.graph.layout import StepLayout
    from stac_backend.export.step import FunctionalStep
    from stac_backend.graph.trt_plugins import _attention

    assert torch.cuda.is_available(), "needs a CUDA GPU"
    dev = torch.device("cuda")
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    model = make_tiny_model(seed=11).to(dev)
    frames = torch.rand(20, 3, 56, 84, generator=torch.Generator().manual_seed(5)).to(dev)
    ok = True
    for cache in (CacheConfig(policy="full"),
                  CacheConfig(policy="stac", retrieval_start_frame=8, voxel_size=0.01, conf_threshold=0.0, max_voxels=64)):
        layout = StepLayout(model.config, cache, 56, 84, max_frames=20)
        step = FunctionalStep(model, layout).eval()
        state = layout.empty_state(1, device=dev)
        ref = Stream(model, cache=cache)
        worst, started = {}, time.perf_counter()
        for i in range(0, 20, 4):
            with torch.inference_mode():
                res = step(frames[i : i + 4][None], torch.tensor([i], device=dev), *[state[n] for n in layout.state_names()])
            outs = dict(zip(step.output_names, (r[0] for r in res[:7])))
            state = dict(zip(layout.state_names(), res[7:]))
            want = ref.push(frames[i : i + 4])
            for k in ("depth", "depth_conf", "world_points", "world_points_conf", "pose_enc", "extrinsics"):
                worst[k] = max(worst.get(k, 0.0), (outs[k] - want[k]).abs().max().item())
        entry = {"max_abs_diff": worst, "seconds": round(time.perf_counter() - started, 2)}
        if cache.policy == "stac":
            entry["pool_voxels"] = int((state["pool_row_key"] >= 0).sum())
            entry["retrieved_per_head"] = int(state["ret_valid"].sum(-1).max())
            entry["engine_retrieved_per_head"] = ref.cache.stats()["retrieved_per_head"]
        report[cache.policy] = entry
        ok &= max(worst.values()) <= 1e-4
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, 4, 116, 16, device=dev, generator=g)
    k = torch.randn(1, 4, 493, 16, device=dev, generator=g)
    v = torch.randn(1, 4, 493, 16, device=dev, generator=g)
    bias = torch.where(torch.rand(1, 4, 493, device=dev, generator=g) < 0.1, 1.5, 0.0)
    valid = torch.rand(1, 4, 493, device=dev, generator=g) < 0.9
    out, mass = _attention(q, k, v, bias, valid, 1)
    ref_out, ref_mass = attention_with_key_mass(q, k, v, key_bias=bias, key_valid=valid)
    report["plugin_attention"] = {"out": (out - ref_out).abs().max().item(), "mass": (mass - ref_mass).abs().max().item()}
    ok &= max(report["plugin_attention"].values()) <= 1e-4
    report["ok"] = bool(ok)
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
