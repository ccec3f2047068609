"""FP8 (e4m3) GEMMs for the large linear layers of the aggregator (opt-in, NVIDIA compute
capability 8.9+: Ada, Hopper).

The qkv, output projection and MLP layers of the frame and global blocks are ~1.9 TFLOP of a
vggt-1b frame. In FP8 the tensor cores run them at up to twice the bf16 rate. Weights are
quantised once, per output row (one float32 scale per row); activations per token row, on the fly,
so one outlier token does not cost the others their precision. ``torch._scaled_mm`` multiplies
the e4m3 operands, applies both scales and writes the working dtype; the bias is added after.

Everything else (attention, norms, heads, the patch embedding) keeps the working dtype. The
deviation this costs on depth, points and pose is measured by ``benchmarks/precision_deviation.py``
(docs/performance.md). ``STAC_FP8=1`` or ``build_model(..., fp8=True)`` turns it on; the state
dict is unchanged (the bf16 weights stay the module's parameters; the e4m3 copies are buffers that
are not saved).

``quantize_rows`` / ``dequantize_rows`` are plain torch and run anywhere (tests check the round
trip on the CPU); ``mode="emulate"`` multiplies the dequantised operands in the working dtype, which
reproduces the FP8 rounding without FP8 hardware (used to measure deviation on the CPU).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SWITCH_ENV = "STAC_FP8"
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
MIN_CAPABILITY = (8, 9)
# Smallest amax a row is scaled by (an all-zero row would divide by zero).
_EPS = 1e-12
# The linear layers of a block that go FP8 (names in ``Block``).
FP8_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def enabled_by_env() -> bool:
    return os.environ.get(SWITCH_ENV, "0") == "1"


def fp8_unsupported_reason(device: torch.device | str) -> Optional[str]:
    """None when ``device`` runs FP8 GEMMs, else a sentence saying what is needed."""
    device = torch.device(device)
    need = f"FP8 GEMMs need an NVIDIA GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ada, Hopper)"
    if device.type != "cuda":
        return f"{need}; the model is on {device.type}"
    if torch.version.cuda is None:
        return f"{need}; this torch has no CUDA FP8 support (built for {torch.version.hip and 'ROCm' or 'another backend'})"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return f"{need}; {torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}"
    return None


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., K] -> (e4m3 values [..., K], float32 scales [..., 1]) with x ~= values * scales.

    Each row's largest magnitude maps to e4m3's largest finite value (448)."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=_EPS)
    scale = amax / FP8_MAX
    values = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return values, scale


def dequantize_rows(values: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (values.float() * scale).to(dtype)


class Fp8Linear(nn.Linear):
    """An ``nn.Linear`` whose forward multiplies in e4m3 (same parameters, same state dict).

    mode "scaled_mm": ``torch._scaled_mm`` (CUDA, capability 8.9+); "emulate": quantise and
    dequantise both operands and multiply in the working dtype (any device; same rounding of the
    operands, for measuring deviation without FP8 hardware)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, mode: str = "scaled_mm"):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if mode not in ("scaled_mm", "emulate"):
            raise ValueError(f"Fp8Linear mode must be 'scaled_mm' or 'emulate', got {mode!r}")
        self.mode = mode
        self.register_buffer("weight_fp8", torch.empty(0, dtype=FP8_DTYPE), persistent=False)
        self.register_buffer("weight_scale", torch.empty(0), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "scaled_mm") -> "Fp8Linear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias  # shared: the state dict is unchanged
        new.mode = mode
        new.register_buffer("weight_fp8", torch.empty(0, dtype=FP8_DTYPE), persistent=False)
        new.register_buffer("weight_scale", torch.empty(0), persistent=False)
        new.quantize_weight()
        return new

    @torch.no_grad()
    def quantize_weight(self) -> None:
        """(Re)make the e4m3 copy of the weight: call after loading or changing the weights."""
        values, scale = quantize_rows(self.weight)  # [N, K], [N, 1]
        self.weight_fp8, self.weight_scale = values, scale.reshape(1, -1).contiguous()  # scale_b: [1, N]

    def _apply(self, fn, recurse=True):
        # .to(dtype) must not turn the e4m3 buffer into bf16: keep it, move it only in device.
        values, scale = self.weight_fp8, self.weight_scale
        out = super()._apply(fn, recurse)
        device = self.weight.device
        self.weight_fp8, self.weight_scale = values.to(device), scale.to(device)
        return out

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        values, scale = quantize_rows(rows)
        if self.mode == "emulate":
            w = dequantize_rows(self.weight_fp8, self.weight_scale.reshape(-1, 1), x.dtype)
            out = F.linear(dequantize_rows(values, scale, x.dtype), w)
        else:
            out = torch._scaled_mm(values, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)


def use_fp8_gemms(model: nn.Module, mode: str = "scaled_mm") -> int:
    """Replace the qkv / proj / fc1 / fc2 layers of the aggregator's frame and global blocks by
    ``Fp8Linear``; returns how many. Refuses (RuntimeError) where FP8 GEMMs cannot run, unless
    ``mode="emulate"``. Layers whose sizes are not multiples of 16 (the FP8 GEMM's tile) stay."""
    param = next(model.parameters())
    if mode == "scaled_mm":
        reason = fp8_unsupported_reason(param.device)
        if reason:
            raise RuntimeError(reason)
        if param.dtype != torch.bfloat16:  # torch._scaled_mm's per-row scaling writes bf16 only
            raise RuntimeError(f"FP8 GEMMs need a bfloat16 model (dtype bfloat16), this one is {param.dtype}")
    aggregator = model.aggregator
    replaced = 0
    for blocks in (aggregator.frame_blocks, aggregator.global_blocks):
        for block in blocks:
            for path in FP8_LAYERS:
                parent_name, name = path.split(".")
                parent = getattr(block, parent_name)
                linear = getattr(parent, name)
                if isinstance(linear, Fp8Linear) or linear.in_features % 16 or linear.out_features % 16:
                    continue
                setattr(parent, name, Fp8Linear.from_linear(linear, mode))
                replaced += 1
    model.fp8_layers = replaced
    return replaced
