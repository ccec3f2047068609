"""Ahead-of-time kernels for the stac TensorRT plugins: launch plans and PTX compilation.

Needs OpenAI Triton (its compiler and bundled ptxas), not TensorRT and not a GPU: PTX for a given
compute capability is produced on any machine, which is what the CI test checks. ``trt_plugins``
turns a plan into what ``@trtp.aot_impl`` returns (kernel name, PTX, ``KernelLaunchParams``,
``SymIntExprs``); TensorRT bakes that into the engine, so the engine runs without Python.

Which ops have an AOT kernel (``AOT_OPS``): ``StacAttention`` and ``StacScoreDecay``.
``StacTopKKeep``, ``StacVoxelPoolUpdate`` and ``StacRetrieve`` stay JIT-only (Python callbacks):
they sort, hash voxels and run merge rounds, which one Triton kernel under the AOT contract (one
launch, no workspace) does not express.

Plans are plain arithmetic on shape expressions, so the same function computes the grid from
TensorRT's symbolic ``ShapeExpr`` (with ``trtp.cdiv``) and from ints (tests, ``cdiv`` below).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

AOT_OPS = ("StacAttention", "StacScoreDecay")
JIT_ONLY_OPS = ("StacTopKKeep", "StacVoxelPoolUpdate", "StacRetrieve")

# PTX ISA 8.3 (CUDA 12.3): Triton's default is its own newest ISA (9.x with triton 3.9), which a
# driver older than that toolkit refuses to JIT. 8.3 covers sm_90a and any CUDA >= 12.3 driver,
# e.g. the NGC 24.10 containers (CUDA 12.6). Override: STAC_TRT_PTX_VERSION=85.
DEFAULT_PTX_VERSION = 83
# Kernels stay under the 48 KiB of static shared memory: above it a launcher must opt the kernel in
# (cuFuncSetAttribute), and we cannot verify here that TensorRT's AOT launcher does.
MAX_SHARED_BYTES = 48 * 1024
DTYPES = {"fp32": "ieee", "fp16": "tf32"}  # pointer type -> tl.dot precision (fp32: exact products)


@dataclass(frozen=True)
class LaunchPlan:
    """Everything needed to compile one kernel and launch it: grid and extra args are expressions."""

    kernel: str  # attribute of stac_backend.kernels.plugin_kernels
    signature: dict[str, str]  # non-constexpr parameters in TensorRT's order: inputs, extra args, outputs
    constexprs: dict[str, Any]
    grid: tuple[Any, Any, Any]
    extra_args: tuple[Any, ...]  # int32 scalars, after the inputs, before the outputs
    num_warps: int = 4
    num_stages: int = 2
    tile: dict[str, int] = field(default_factory=dict)  # block sizes the grid was computed with


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    ptx: str
    num_warps: int
    shared: int
    params: tuple[str, ...]  # PTX parameter names of the entry, after trimming
    capability: int


def cdiv(a, b):
    """Ceil division for ints (TensorRT expressions use trtp.cdiv)."""
    return -(-a // b)


# ---------------------------------------------------------------------------------------- plans
def attention_plan(q_shape: Sequence, k_shape: Sequence, dtype: str, need_mass: int, head_dim: int,
                   div: Callable = cdiv) -> LaunchPlan:
    """StacAttention: q [B,H,M,D], k/v [B,H,N,D], key_bias [B,H,N], key_valid [B,H,N] -> out, mass."""
    if dtype not in DTYPES:
        raise ValueError(f"StacAttention AOT kernel: unsupported dtype {dtype} (fp32 or fp16)")
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
        raise ValueError(f"StacAttention AOT kernel: head dim must be a power of two in [16, 256], got {head_dim}")
    B, H, M = q_shape[0], q_shape[1], q_shape[2]
    N = k_shape[2]
    signature = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "BIAS": "*fp32", "VALID": "*i1",
                 "H": "i32", "M": "i32", "N": "i32", "OUT": f"*{dtype}", "MASS": "*fp32"}
    # tiles shrink with the head dim so that q, k and v tiles (fp32) stay under 48 KiB of shared memory
    block_m, block_n = (64, 64) if head_dim <= 64 else (32, 32) if head_dim <= 128 else (16, 16)
    constexprs = {"QK_SCALE": LOG2E / math.sqrt(head_dim), "D": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n,
                  "PRECISION": DTYPES[dtype]}
    if need_mass:
        grid = (B * H, 1, 1)  # one program per (batch, head): see plugin_kernels
        kernel = "attention_mass_kernel"
    else:
        grid = (div(M, block_m), B * H, 1)
        kernel = "attention_out_kernel"
    return LaunchPlan(kernel, signature, constexprs, grid, (H, M, N), num_warps=4, num_stages=1,
                      tile={"BLOCK_M": block_m, "BLOCK_N": block_n})


def score_decay_plan(hot_score_shape: Sequence, mass_shape: Sequence, ret_valid_shape: Sequence, gamma: float,
                     div: Callable = cdiv) -> LaunchPlan:
    """StacScoreDecay: hot_score [B,L,H,Ns], hot_len [B,L], mass [B,L,H,Ns+T+M], ret_valid [B,L,H,T] -> score."""
    B, L, H, Ns = hot_score_shape[0], hot_score_shape[1], hot_score_shape[2], hot_score_shape[3]
    T = ret_valid_shape[3]
    M = mass_shape[3] - Ns - T
    signature = {"HOT_SCORE": "*fp32", "HOT_LEN": "*i64", "MASS": "*fp32", "RET_VALID": "*i1",
                 "H": "i32", "NS": "i32", "T": "i32", "M": "i32", "SCORE": "*fp32"}
    block = 1024
    return LaunchPlan("score_decay_kernel", signature, {"GAMMA": float(gamma), "BLOCK": block}, (B * L * H, 1, 1),
                      (H, Ns, T, M), num_warps=4, num_stages=1, tile={"BLOCK": block})


LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------- compilation
def target_capability() -> int:
    """Compute capability to compile for: STAC_TRT_AOT_ARCH (e.g. 90), else the GPU's, else 90 (H100/H200)."""
    if os.environ.get("STAC_TRT_AOT_ARCH"):
        return int(os.environ["STAC_TRT_AOT_ARCH"])
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return major * 10 + minor
    except Exception:  # noqa: BLE001 - no usable CUDA: fall back to Hopper
        pass
    return 90


def compile_plan(plan: LaunchPlan, capability: int | None = None, ptx_version: int | None = None) -> CompiledKernel:
    """PTX of the plan's kernel (Triton's compiler; no GPU needed), trimmed to TensorRT's argument list."""
    import triton
    from triton.backends.compiler import GPUTarget

    from ..kernels import plugin_kernels

    capability = capability or target_capability()
    ptx_version = ptx_version or int(os.environ.get("STAC_TRT_PTX_VERSION", DEFAULT_PTX_VERSION))
    fn = getattr(plugin_kernels, plan.kernel)
    signature = {**plan.signature, **{name: "constexpr" for name in plan.constexprs}}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=dict(plan.constexprs))
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": plan.num_warps, "num_stages": plan.num_stages,
                                       "ptx_version": ptx_version,
                                       # explicit: Triton 3.9 warns that its default (fused mul-add) changes in 3.10
                                       "enable_fp_fusion": True})
    meta = compiled.metadata
    for scratch in ("global_scratch_size", "profile_scratch_size"):
        if getattr(meta, scratch, 0):
            raise RuntimeError(f"{plan.kernel} needs Triton {scratch}={getattr(meta, scratch)}: TensorRT's AOT "
                               "launcher passes no scratch buffer")
    if meta.shared > MAX_SHARED_BYTES:
        raise RuntimeError(f"{plan.kernel} uses {meta.shared} B of shared memory (> {MAX_SHARED_BYTES})")
    ptx = drop_unused_trailing_params(compiled.asm["ptx"], meta.name, keep=len(plan.signature))
    return CompiledKernel(meta.name, ptx, meta.num_warps, meta.shared, tuple(entry_params(ptx, meta.name)), capability)


# ------------------------------------------------------------------------------- PTX parameters
def _entry(ptx: str, name: str) -> re.Match:
    match = re.search(rf"\.entry\s+{re.escape(name)}\s*\((?P<params>[^)]*)\)", ptx)
    if match is None:
        raise ValueError(f"no .entry {name} in the PTX")
    return match


def entry_params(ptx: str, name: str) -> list[str]:
    """Parameter names of the kernel's .entry, in order."""
    return re.findall(r"\.param\s+[^,]*?\s(\S+?)\s*(?:,|$)", _entry(ptx, name)["params"].strip())


def drop_unused_trailing_params(ptx: str, name: str, keep: int) -> str:
    """Remove the entry's parameters after the first ``keep``, refusing if the body reads any.

    Triton >= 3.3 appends hidden ``global_scratch`` / ``profile_scratch`` pointers to every kernel.
    TensorRT launches an AOT kernel with exactly (inputs, extra args, outputs); left in, the driver
    would read two kernel-parameter slots past TensorRT's argument array. They are dead when the
    kernel needs no scratch (checked by the caller), so the entry is cut to TensorRT's list.
    """
    params = entry_params(ptx, name)
    if len(params) < keep:
        raise ValueError(f"{name} has {len(params)} PTX parameters, expected at least {keep}")
    extra = params[keep:]
    if not extra:
        return ptx
    match = _entry(ptx, name)
    body = ptx[match.end():]
    for param in extra:
        if re.search(rf"\b{re.escape(param)}\b", body):
            raise ValueError(f"{name}: trailing parameter {param} is used by the kernel; cannot drop it")
    lines = [ln for ln in match["params"].split("\n") if not any(re.search(rf"\b{re.escape(p)}\b", ln) for p in extra)]
    kept = "\n".join(lines).rstrip().rstrip(",") + "\n"
    return ptx[: match.start("params")] + kept + ptx[match.end("params"):]


# ------------------------------------------------------------------------------ direct launch
def run_plan(plan: LaunchPlan, inputs: Sequence, outputs: Sequence) -> None:
    """Launch the plan's kernel through Triton's own launcher exactly as TensorRT would: same grid,
    same (inputs, int extra args, outputs) order. For checking the kernels without TensorRT: on a
    GPU, or on CPU tensors under TRITON_INTERPRET=1. The plan must have been made with int shapes."""
    from ..kernels import plugin_kernels

    fn = getattr(plugin_kernels, plan.kernel)
    grid = tuple(int(g) for g in plan.grid)
    fn[grid](*inputs, *(int(e) for e in plan.extra_args), *outputs, **plan.constexprs,
             num_warps=plan.num_warps, num_stages=plan.num_stages)
