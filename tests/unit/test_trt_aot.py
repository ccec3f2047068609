"""AOT kernels of the stac TensorRT plugins, checked without TensorRT and without a GPU.

- PTX: Triton's compiler (bundled ptxas) compiles each plan for sm_90; the entry has the kernel's
  name and exactly TensorRT's argument list (Triton's hidden scratch pointers removed).
- Launch arithmetic: the plan's grid covers every row with the kernel's block sizes.
- Numerics: the kernels, launched with the plan's grid and (inputs, int args, outputs) order as
  TensorRT would, in Triton's CPU interpreter (subprocess: TRITON_INTERPRET is read at import)
  against the reference ops.
- The aot_impl definitions against a stand-in tensorrt.plugin (returned name, PTX, launch params).
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("triton.compiler")
pytest.importorskip("triton.backends.compiler")

from stac_backend.export import trt_aot  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHAPES = [(1, 16, 4164, 13533, 64), (2, 4, 37, 91, 64), (4, 2, 1, 5, 128), (3, 1, 200, 200, 16)]


@pytest.fixture(scope="module")
def compiled():
    """One compile per kernel variant (a few seconds each)."""
    plans = {
        "out": trt_aot.attention_plan((2, 4, 37, 64), (2, 4, 91, 64), "fp32", 0, 64),
        "mass": trt_aot.attention_plan((2, 4, 37, 64), (2, 4, 91, 64), "fp32", 1, 64),
        "decay": trt_aot.score_decay_plan((2, 3, 4, 11), (2, 3, 4, 23), (2, 3, 4, 5), 0.9),
    }
    return {key: (plan, trt_aot.compile_plan(plan, capability=90)) for key, plan in plans.items()}


@pytest.mark.parametrize("key,entry", [("out", "attention_out_kernel"), ("mass", "attention_mass_kernel"),
                                       ("decay", "score_decay_kernel")])
def test_ptx_for_sm90_with_tensorrt_argument_list(compiled, key, entry):
    plan, kernel = compiled[key]
    assert kernel.name == entry
    assert ".target sm_90a" in kernel.ptx and f".entry {entry}(" in kernel.ptx
    assert ".version 8.3" in kernel.ptx  # loadable by CUDA >= 12.3 drivers (trt_aot.DEFAULT_PTX_VERSION)
    # TensorRT passes inputs, int32 extra args, outputs - nothing else
    assert len(kernel.params) == len(plan.signature)
    assert len(plan.extra_args) == sum(1 for t in plan.signature.values() if t == "i32")
    assert kernel.shared <= trt_aot.MAX_SHARED_BYTES
    assert kernel.num_warps == plan.num_warps


def test_launch_grid_matches_block_sizes():
    for B, H, M, N, D in SHAPES:
        plan = trt_aot.attention_plan((B, H, M, D), (B, H, N, D), "fp32", 0, D)
        bm = plan.constexprs["BLOCK_M"]
        assert plan.tile["BLOCK_M"] == bm and plan.tile["BLOCK_N"] == plan.constexprs["BLOCK_N"]
        gx, gy, gz = plan.grid
        assert (gx - 1) * bm < M <= gx * bm and gy == B * H and gz == 1  # every query row, no empty program
        assert plan.extra_args == (H, M, N)
        mass = trt_aot.attention_plan((B, H, M, D), (B, H, N, D), "fp32", 1, D)
        assert mass.grid == (B * H, 1, 1) and mass.extra_args == (H, M, N)
    decay = trt_aot.score_decay_plan((2, 24, 16, 7287), (2, 24, 16, 7287 + 2082 + 4164), (2, 24, 16, 2082), 0.9)
    assert decay.grid == (2 * 24 * 16, 1, 1) and decay.extra_args == (16, 7287, 2082, 4164)


def test_plan_arithmetic_is_symbolic():
    """TensorRT hands ShapeExprs: the plan must only use +, -, * and the given cdiv on them."""

    class Sym:
        def __init__(self, text):
            self.text = text

        def _op(self, other, op):
            return Sym(f"({self.text}{op}{getattr(other, 'text', other)})")

        __add__ = lambda s, o: s._op(o, "+")  # noqa: E731
        __sub__ = lambda s, o: s._op(o, "-")  # noqa: E731
        __mul__ = lambda s, o: s._op(o, "*")  # noqa: E731

    shape = [Sym(n) for n in "BHMD"]
    plan = trt_aot.attention_plan(shape, [Sym("B"), Sym("H"), Sym("N"), Sym("D")], "fp32", 0, 64,
                                  div=lambda a, b: Sym(f"cdiv({a.text},{b})"))
    assert plan.grid[0].text == "cdiv(M,64)" and plan.grid[1].text == "(B*H)"
    decay = trt_aot.score_decay_plan([Sym(n) for n in ("B", "L", "H", "Ns")], [Sym("B"), Sym("L"), Sym("H"), Sym("W")],
                                     [Sym("B"), Sym("L"), Sym("H"), Sym("T")], 0.9)
    assert decay.extra_args[3].text == "((W-Ns)-T)"


def test_drop_unused_trailing_params_refuses_used_ones():
    ptx = ".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u32 k_param_1,\n\t.param .u64 k_param_2\n)\n{\n\tld.param.b64 %rd1, [k_param_2];\n}"
    with pytest.raises(ValueError, match="used"):
        trt_aot.drop_unused_trailing_params(ptx, "k", keep=2)
    trimmed = trt_aot.drop_unused_trailing_params(ptx.replace("[k_param_2]", "[k_param_0]"), "k", keep=2)
    assert trt_aot.entry_params(trimmed, "k") == ["k_param_0", "k_param_1"]


_INTERPRETER_CHECK = r"""
import os
import torch
from stac_backend.export import trt_aot
from stac_backend.graph.ops import attention_impl, score_decay_impl
dev = os.environ.get("STAC_CHECK_DEVICE", "cpu")
g = torch.Generator().manual_seed(0)
worst = 0.0
for need_mass in (0, 1):
    for B, H, M, N, D in [(2, 3, 37, 91, 16), (1, 2, 70, 130, 32)]:
        q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (M, N, N))
        bias = torch.randn(B, H, N, generator=g).abs().log1p()
        valid = torch.rand(B, H, N, generator=g) > 0.2
        valid[0, 0] = False  # a head without any valid key: output 0, mass 0
        ref_out, ref_mass = attention_impl(q.double(), k.double(), v.double(), bias.double(), valid, need_mass)
        out, mass = torch.full_like(q, float("nan")), torch.full((B, H, N), float("nan"))  # TensorRT does not zero
        args = [t.to(dev) for t in (q, k, v, bias, valid, out, mass)]
        trt_aot.run_plan(trt_aot.attention_plan(q.shape, k.shape, "fp32", need_mass, D), args[:5], args[5:])
        out, mass = args[5].cpu(), args[6].cpu()
        worst = max(worst, (out.double() - ref_out).abs().max().item(), (mass.double() - ref_mass.double()).abs().max().item())
        assert torch.equal(mass[~valid], torch.zeros_like(mass[~valid]))
B, L, H, Ns, T, M = 2, 3, 4, 11, 5, 7
hot_score, hot_len = torch.rand(B, L, H, Ns, generator=g), torch.randint(0, Ns + 1, (B, L), generator=g)
mass = torch.rand(B, L, H, Ns + T + M, generator=g)
ret_valid = torch.rand(B, L, H, T, generator=g) > 0.5
ret_valid[1, 1] = False  # a layer that attended no retrieved key
ref = score_decay_impl(hot_score, hot_len, mass, ret_valid, 0.9)
score = torch.full_like(ref, float("nan")).to(dev)
trt_aot.run_plan(trt_aot.score_decay_plan(hot_score.shape, mass.shape, ret_valid.shape, 0.9),
                 [t.to(dev) for t in (hot_score, hot_len, mass, ret_valid)], (score,))
score = score.cpu()
worst = max(worst, (score - ref).abs().max().item())
print("WORST", worst)
"""


def _run_kernel_check(env: dict) -> float:
    done = subprocess.run([sys.executable, "-c", _INTERPRETER_CHECK], env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return float(done.stdout.split("WORST")[-1])


def test_kernels_match_the_reference_ops_in_triton_interpreter():
    import torch

    if torch.cuda.is_available():  # the interpreter stands in for a GPU; with one, the native test below runs
        pytest.skip("a CUDA GPU is present: test_kernels_match_the_reference_ops_on_cuda checks the compiled kernels")
    worst = _run_kernel_check({"TRITON_INTERPRET": "1", "STAC_CHECK_DEVICE": "cpu"})
    assert worst <= 1e-5, worst


def test_kernels_match_the_reference_ops_on_cuda():
    """The same kernels compiled for and run on the GPU (where one exists): what TensorRT would launch."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    worst = _run_kernel_check({"TRITON_INTERPRET": "0", "STAC_CHECK_DEVICE": "cuda"})
    assert worst <= 5e-3, worst  # fp32 dot products on tensor cores (tf32) round differently from float64


def test_aot_impls_against_a_tensorrt_stand_in(monkeypatch):
    """The datacenter-only AOT definitions cover exactly trt_aot.AOT_OPS, and what their aot_impl
    returns is (name, PTX, launch params from the plan, int32 extra args)."""
    import torch
    import torch._dynamo  # noqa: F401 - before the stand-in (it probes for tensorrt)

    registered: dict[str, dict] = {}

    class Desc:
        def __init__(self, shape, dtype):
            self.shape_expr, self.dtype = list(shape), dtype

        def like(self):
            return Desc(self.shape_expr, self.dtype)

    class Params:
        pass

    def recorder(kind):
        return lambda pid: (lambda f: registered.setdefault(pid, {}).setdefault(kind, f))

    trtp = types.ModuleType("tensorrt.plugin")
    trtp.TensorDesc, trtp.Tensor, trtp.KernelLaunchParams = Desc, object, Params
    trtp.register, trtp.impl, trtp.aot_impl = recorder("desc"), recorder("impl"), recorder("aot")
    trtp.from_shape_expr = lambda shape, dtype: Desc(shape, dtype)
    trtp.cdiv = trt_aot.cdiv
    trtp.SymInt32 = lambda e: ("i32", e)
    trtp.SymIntExprs = types.SimpleNamespace(from_tuple=tuple)
    trt = types.ModuleType("tensorrt")
    trt.float32, trt.float16, trt.int64, trt.int32, trt.bool = torch.float32, torch.float16, torch.int64, torch.int32, torch.bool
    trt.plugin = trtp
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setenv("STAC_TRT_AOT_ARCH", "90")
    from stac_backend.export import trt_aot_plugins

    trt_aot_plugins._define(trt, trtp)
    ids = {op: f"stac::{op}" for op in trt_aot.AOT_OPS}
    assert sorted(registered) == sorted(ids.values())
    assert all({"desc", "aot"} <= set(registered[pid]) for pid in ids.values())

    B, H, M, N, D = 2, 4, 37, 91, 64
    f32 = torch.float32
    args = [Desc((B, H, M, D), f32), Desc((B, H, N, D), f32), Desc((B, H, N, D), f32), Desc((B, H, N), f32),
            Desc((B, H, N), torch.bool)]
    name, ptx, params, extra = registered[ids["StacAttention"]]["aot"](*args, 1, outputs=())
    assert name == b"attention_mass_kernel" and b".entry attention_mass_kernel(" in ptx and b"sm_90a" in ptx
    assert (params.grid_x, params.grid_y, params.grid_z) == (B * H, 1, 1) and params.block_x == 128
    assert extra == (("i32", H), ("i32", M), ("i32", N))
    name, _, params, _ = registered[ids["StacAttention"]]["aot"](*args, 0, outputs=())
    assert name == b"attention_out_kernel" and (params.grid_x, params.grid_y) == (1, B * H)
    decay = registered[ids["StacScoreDecay"]]["aot"]
    name, _, params, extra = decay(Desc((B, 3, H, 11), f32), Desc((B, 3), torch.int64), Desc((B, 3, H, 23), f32),
                                   Desc((B, 3, H, 5), torch.bool), 0.9, outputs=())
    assert name == b"score_decay_kernel" and params.grid_x == B * 3 * H and extra[-1] == ("i32", 23 - 11 - 5)


def test_mark_aot_nodes(tmp_path):
    """The engine build's graph copy: aot=1 on AOT ops only, the schema accepts it, the original is unchanged."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from stac_backend.graph import onnx_ops  # noqa: F401 - registers the stac schemas
    from stac_backend.export.trt_build import mark_aot_nodes, plugin_ops

    plugin = {"plugin_namespace": "stac", "plugin_version": "1"}
    nodes = [helper.make_node("StacAttention", ["q", "k", "v", "b", "m"], ["o", "mass"], domain="stac", need_mass=1, **plugin),
             helper.make_node("StacRetrieve", ["q"], ["r"], domain="stac", **plugin)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "qkvbm"],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("o", "mass", "r")])
    path = tmp_path / "step.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("stac", 1)]), path)
    marked = mark_aot_nodes(path)
    assert marked.name == "step.aot.onnx"
    assert plugin_ops(marked) == {"aot_ops": ["StacAttention"], "python_ops": ["StacRetrieve"]}
    assert plugin_ops(path) == {"aot_ops": [], "python_ops": ["StacAttention", "StacRetrieve"]}
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version, ctx.opset_imports = onnx.IR_VERSION, {"": 18, "stac": 1}
    onnx.checker.check_node(onnx.load(marked).graph.node[0], ctx)  # the stac schema knows the aot attribute
