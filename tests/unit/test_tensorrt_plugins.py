"""TensorRT: the stac plugins, the engine build from the exported graph and the TensorRT runtime.

TensorRT cannot be installed on the project's machines (no wheel reachable, no Debian package, none on
the GPU machine; docs/export.md): the tests that need it skip without ``tensorrt`` and a CUDA GPU.
Where both exist (the NGC Triton container), they build an engine of the tiny model's full and stac
steps and check a 20-frame stream against the torch engine on the GPU. What runs here: the plugin
definitions against a stand-in ``tensorrt.plugin`` (parameter names, output shapes and dtypes).
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import types

import pytest
import torch
import torch._dynamo  # noqa: F401 - imported before the tensorrt stand-in below (it probes for tensorrt)
from torch._subclasses.fake_tensor import FakeTensorMode

from stac_backend.cache import CacheConfig
from stac_backend.engine import Stream
from stac_backend.export.onnx_export import export_step

from conftest import make_tiny_model

H, W = 56, 84
STAC = CacheConfig(policy="stac", retrieval_start_frame=8, voxel_size=0.01, conf_threshold=0.0, max_voxels=64,
                   retrieve_before_prune=False, pool_carry_slots=0)  # the exported step's order, no carry-over
needs_tensorrt = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
    reason="tensorrt is not installed (not installable here; see docs/export.md) or no CUDA GPU",
)


class _Desc:
    """Stands in for trtp.TensorDesc: shape_expr of plain ints (the same arithmetic)."""

    def __init__(self, shape, dtype):
        self.shape_expr, self.dtype = list(shape), dtype

    def like(self):
        return _Desc(self.shape_expr, self.dtype)


def test_plugin_definitions_match_the_onnx_nodes_without_tensorrt(monkeypatch):
    """Runs here: the plugin definitions against a stand-in tensorrt.plugin. The ONNX parser hands
    a node's inputs positionally and its attributes by name, so each plugin's parameters must be the
    schema's inputs then attributes; output shapes must equal the torch ops' fake shapes."""
    registered: dict[str, dict] = {}
    trtp = types.ModuleType("tensorrt.plugin")
    trtp.TensorDesc, trtp.Tensor = _Desc, object
    trtp.register = lambda pid: (lambda f: registered.setdefault(pid, {}).setdefault("desc", f))
    trtp.impl = lambda pid: (lambda f: registered.setdefault(pid, {}).setdefault("impl", f))
    trtp.from_shape_expr = lambda shape, dtype: _Desc(shape, dtype)
    trt = types.ModuleType("tensorrt")
    trt.float32, trt.int64, trt.int32, trt.bool = torch.float32, torch.int64, torch.int32, torch.bool
    trt.plugin = trtp
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    from stac_backend.export import trt_plugins
    from stac_backend.export.onnx_ops import SPECS
    from stac_backend.export.ops import PLUGIN_NAMES

    monkeypatch.setattr(trt_plugins, "_registered", False)
    trt_plugins.register()
    dtypes = {"F": torch.float32, "I32": torch.int32, "I64": torch.int64, "B": torch.bool}
    B, L, Hh, Ns, T, M, D, V = 2, 3, 4, 11, 5, 7, 16, 6
    C = 1  # world points of one frame whose tokens are M: only shapes matter to the descriptions
    shapes = {
        "q": (B, Hh, M, D), "k": (B, Hh, Ns + T + M, D), "v": (B, Hh, Ns + T + M, D), "key_bias": (B, Hh, Ns + T + M),
        "key_valid": (B, Hh, Ns + T + M), "hot_score": (B, L, Hh, Ns), "hot_len": (B, L), "mass": (B, L, Hh, Ns + T + M),
        "ret_valid": (B, L, Hh, T), "hot_k": (B, L, Hh, Ns, D), "hot_v": (B, L, Hh, Ns, D), "hot_frame": (B, L, Hh, Ns),
        "hot_index": (B, L, Hh, Ns), "hot_pos": (B, L, Hh, Ns, 3), "new_k": (B, L, Hh, M, D), "new_v": (B, L, Hh, M, D),
        "score": (B, L, Hh, Ns + M), "world_points": (B, C, 14, 14, 3), "world_points_conf": (B, C, 14, 14),
        "frame_offset": (B,), "piv_k": (B, L, Hh, V, 4, D), "piv_v": (B, L, Hh, V, 4, D), "piv_w": (B, L, Hh, V, 4),
        "piv_s": (B, L, Hh, V, 4), "piv_c": (B, L, Hh, V, 4), "buf_k": (B, L, Hh, V, 8, D), "buf_v": (B, L, Hh, V, 8, D),
        "buf_s": (B, L, Hh, V, 8), "buf_n": (B, L, Hh, V), "row_key": (B, V), "row_last_used": (B, V),
        "ev_k": (B, L, Hh, M, D), "ev_v": (B, L, Hh, M, D), "ev_score": (B, L, Hh, M), "ev_pos": (B, L, Hh, M, 3),
        "ev_len": (B, L), "steps": (B, 1), "ret_k": (B, L, Hh, T, D), "ret_v": (B, L, Hh, T, D),
        "ret_bias": (B, L, Hh, T), "latest_frame": (B,),
    }
    for torch_name, op_type in PLUGIN_NAMES.items():
        _, inputs, outputs, attrs = SPECS[op_type]
        entry = registered[trt_plugins.PLUGIN_IDS[op_type]]
        names = [n for n, _ in inputs] + [a for a, _, _ in attrs]
        assert list(inspect.signature(entry["desc"]).parameters) == names, op_type
        assert list(inspect.signature(entry["impl"]).parameters) == names + ["outputs", "stream"], op_type
        attr_values = {a: ([0] if kind == onnx_ints() else 1) for a, kind, _ in attrs}
        descs = entry["desc"](*[_Desc(shapes[n], dtypes[t]) for n, t in inputs], **attr_values)
        descs = descs if isinstance(descs, tuple) else (descs,)
        with FakeTensorMode():
            fakes = getattr(torch.ops.stac, torch_name)(*[torch.empty(shapes[n], dtype=dtypes[t]) for n, t in inputs],
                                                         *attr_values.values())
        fakes = fakes if isinstance(fakes, (tuple, list)) else (fakes,)
        assert len(descs) == len(outputs) == len(fakes), op_type
        for (name, kind), desc, fake in zip(outputs, descs, fakes):
            assert tuple(desc.shape_expr) == tuple(fake.shape), f"{op_type}.{name}"
            assert desc.dtype == fake.dtype == dtypes[kind], f"{op_type}.{name}"


def onnx_ints():
    import onnx

    return onnx.defs.OpSchema.AttrType.INTS


@needs_tensorrt
def test_plugins_register():
    import tensorrt as trt

    from stac_backend.export.trt_plugins import PLUGIN_IDS, register

    register()
    register()  # idempotent
    registry = trt.get_plugin_registry()
    names = {(c.name, c.plugin_namespace) for c in registry.all_creators}
    for plugin_id in PLUGIN_IDS.values():
        namespace, name = plugin_id.split("::")
        assert (name, namespace) in names, plugin_id


@needs_tensorrt
@pytest.mark.parametrize("cache", [CacheConfig(policy="full"), STAC], ids=["full", "stac"])
def test_engine_stream_matches_torch_engine(tmp_path, cache):
    from stac_backend.export.trt_build import build_engine
    from stac_backend.export.trt_runtime import TensorRTStream

    model = make_tiny_model(seed=11)
    onnx_path = export_step(model, cache, tmp_path / "step.onnx", height=H, width=W, max_frames=20, optimize=False)
    plan = build_engine(onnx_path, tmp_path / "step.plan", max_batch=2)
    stream = TensorRTStream(plan)
    reference = Stream(model.cuda(), cache=cache)
    frames = torch.rand(20, 3, H, W, generator=torch.Generator().manual_seed(5))
    for i in range(0, 20, 4):
        got, want = stream.push(frames[i : i + 4]), reference.push(frames[i : i + 4])
        for key in ("depth", "world_points", "pose_enc", "extrinsics"):
            diff = (got[key].float().cpu() - want[key].float().cpu()).abs().max().item()
            assert diff <= 1e-4, f"{cache.policy} step {i // 4} {key} differs by {diff}"
    assert stream.memory_bytes() == stream.layout.state_bytes()
