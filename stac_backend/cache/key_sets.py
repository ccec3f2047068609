"""One attention call for the queries of several streams, each over its own key set.

Streams hold caches of different lengths (and some policies add biased or padded keys), so the
key sets are right-padded to the longest and masked. When no stream needs per-key probability
mass and no bias is present, the call is plain scaled-dot-product attention (fast fused kernels);
otherwise the attention that also returns per-key mass: on CUDA the fused Triton kernels, over the
padded keys or (``STAC_SEGMENTED_ATTENTION=1``) over each stream's key segments where they lie,
with only the small bias/valid masks padded; elsewhere the blockwise reference over padded keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import attention_with_key_mass


@dataclass
class KeySet:
    """The keys/values one stream's queries attend to at one layer in this step."""

    # [H, Nk, D]: retained past tokens (+ retrieved ones) + the step's new tokens; or a tuple of
    # such tensors (segments along the key axis, e.g. views of a store and the retrieved tokens),
    # which a batched call copies straight into its padded key buffer (the segmented kernel reads
    # them where they lie instead).
    k: Union[Tensor, tuple[Tensor, ...]]
    v: Union[Tensor, tuple[Tensor, ...]]
    bias: Optional[Tensor] = None  # [H, Nk] float32 additive logit bias (e.g. log C of pivots)
    valid: Optional[Tensor] = None  # [H, Nk] bool; False = padding
    need_mass: bool = False  # whether absorb() wants the per-key probability mass
    # Keys [start, end) whose mass absorb() does not read (e.g. retrieved keys): their mass is
    # returned as 0 and, on the fused kernel, blocks of them skip the mass pass.
    mass_skip: Optional[tuple[int, int]] = None
    # Sum the mass over every N-th query only (CacheConfig.mass_query_stride; 1 = all queries). A
    # batched call uses the smallest stride of the streams that read mass.
    mass_query_stride: int = 1

    @property
    def num_keys(self) -> int:
        return sum(t.shape[1] for t in _segments(self.k))


def _segments(x: Union[Tensor, tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    return (x,) if isinstance(x, Tensor) else tuple(x)


def _joined(x: Union[Tensor, tuple[Tensor, ...]]) -> Tensor:
    parts = _segments(x)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _write_segments(dst: Tensor, x: Union[Tensor, tuple[Tensor, ...]]) -> None:
    """Copy the segments of ``x`` one after the other into ``dst`` [H, >= Nk, D]."""
    start = 0
    for part in _segments(x):
        dst[:, start : start + part.shape[1]] = part
        start += part.shape[1]


# On CUDA with OpenAI Triton installed, the fused kernel replaces the blockwise reference
# (STAC_FUSED_ATTENTION=0 turns it off, e.g. to compare).
USE_FUSED = os.environ.get("STAC_FUSED_ATTENTION", "1") != "0"
# Opt-in (STAC_SEGMENTED_ATTENTION=1): the fused kernel reads each stream's key segments where they
# lie instead of a joined (one stream) or padded (several) copy. It removes those copies, but on an
# H100 the engine with it and the slot store together ran slower than without both
# (docs/performance.md), so it stays off until a profile says which part loses.
USE_SEGMENTED = os.environ.get("STAC_SEGMENTED_ATTENTION", "0") == "1"
# Tests set this to run the fused kernels on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1).
_FUSED_OFF_CUDA = False


def _fused(q: Tensor) -> bool:
    """Whether the mass-returning attention on q's device is the fused Triton kernel."""
    if not USE_FUSED or not (q.is_cuda or _FUSED_OFF_CUDA):
        return False
    from ..kernels.attention_mass import HAVE_TRITON, fused_available

    return fused_available(q.device) or (_FUSED_OFF_CUDA and HAVE_TRITON)


def _segmented(q: Tensor) -> bool:
    """Whether this call reads the key segments in place (the segmented fused kernel)."""
    return USE_SEGMENTED and _fused(q)


def _segment_pairs(s: KeySet) -> list[tuple[Tensor, Tensor]]:
    """The set's keys as (k, v) segment pairs for the segmented kernel (joined if k and v are split differently)."""
    ks, vs = _segments(s.k), _segments(s.v)
    if [t.shape[1] for t in ks] != [t.shape[1] for t in vs]:
        return [(_joined(s.k), _joined(s.v))]
    return list(zip(ks, vs))


def _fused_segmented(q, sets, bias, valid, need_mass, mass_keys, mass_query_stride):
    from ..kernels.attention_mass import fused_segmented_attention_with_key_mass

    return fused_segmented_attention_with_key_mass(q, [_segment_pairs(s) for s in sets], bias, valid, need_mass,
                                                   mass_keys=mass_keys, mass_query_stride=mass_query_stride)


def _attention_with_mass(q, k, v, bias, valid, need_mass, mass_keys=None, mass_query_stride=1):
    """Output and per-key mass; ``mass_keys`` [B, H, N] (bool, or None = all): the keys whose mass
    is read, the others' mass is 0 on every path."""
    if _fused(q):
        from ..kernels.attention_mass import fused_attention_with_key_mass

        return fused_attention_with_key_mass(q, k, v, bias, valid, need_mass, mass_keys=mass_keys,
                                             mass_query_stride=mass_query_stride)
    out, mass = attention_with_key_mass(q, k, v, key_bias=bias, key_valid=valid, need_mass=need_mass,
                                        mass_query_stride=mass_query_stride)
    if mass is not None and mass_keys is not None:
        mass = mass.masked_fill(~mass_keys, 0.0)
    return out, mass


def _mass_keys(sets: Sequence[KeySet], B: int, H: int, N: int, device) -> Optional[Tensor]:
    """[B, H, N] bool: the keys whose mass some stream reads (None where that is every key)."""
    if not any(s.mass_skip for s in sets) and all(s.num_keys == N for s in sets):
        return None
    keys = torch.zeros(B, N, dtype=torch.bool, device=device)
    for b, s in enumerate(sets):
        if s.need_mass:
            keys[b, : s.num_keys] = True
            if s.mass_skip:
                keys[b, s.mass_skip[0] : s.mass_skip[1]] = False
    return keys[:, None, :].expand(B, H, N)


def attend_key_sets(q: Tensor, sets: Sequence[KeySet]) -> tuple[Tensor, list[Optional[Tensor]]]:
    """q [B, H, M, D] (stream b's queries in row b); returns out [B, H, M, D] and per-stream mass [H, Nk_b] (or None)."""
    if q.shape[0] != len(sets):
        raise ValueError(f"{q.shape[0]} query rows but {len(sets)} key sets")
    need_mass = any(s.need_mass for s in sets)
    if len(sets) == 1:
        s = sets[0]
        if not need_mass and s.bias is None and s.valid is None:
            return F.scaled_dot_product_attention(q, _joined(s.k)[None], _joined(s.v)[None]), [None]
        bias = None if s.bias is None else s.bias[None]
        valid = None if s.valid is None else s.valid[None]
        mass_keys = _mass_keys(sets, 1, q.shape[1], s.num_keys, q.device) if need_mass else None
        if _segmented(q):
            out, mass = _fused_segmented(q, sets, bias, valid, need_mass, mass_keys, s.mass_query_stride)
        else:
            out, mass = _attention_with_mass(q, _joined(s.k)[None], _joined(s.v)[None], bias, valid, need_mass,
                                             mass_keys, s.mass_query_stride)
        return out, [mass[0] if s.need_mass else None]

    H = q.shape[1]
    lengths = [s.num_keys for s in sets]
    longest = max(lengths)
    valid = torch.zeros(len(sets), H, longest, dtype=torch.bool, device=q.device)
    has_bias = any(s.bias is not None for s in sets)
    bias = torch.zeros(len(sets), H, longest, device=q.device) if has_bias else None
    for b, s in enumerate(sets):
        n = lengths[b]
        valid[b, :, :n] = True if s.valid is None else s.valid
        if s.bias is not None:
            bias[b, :, :n] = s.bias
    if not need_mass and not has_bias:
        keys, values = _padded_keys(q, sets, lengths, longest)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=valid[:, :, None, :])
        return out, [None] * len(sets)
    mass_keys = _mass_keys(sets, len(sets), H, longest, q.device)
    stride = min(s.mass_query_stride for s in sets if s.need_mass) if need_mass else 1
    if _segmented(q):
        # The segmented kernel treats keys past a stream's end as absent, so valid matters only
        # where some set has one (without bias or valid it skips the bias loads).
        any_valid = any(s.valid is not None for s in sets)
        out, mass = _fused_segmented(q, sets, bias, valid if any_valid else None, need_mass, mass_keys, stride)
    else:
        keys, values = _padded_keys(q, sets, lengths, longest)
        out, mass = _attention_with_mass(q, keys, values, bias, valid, True, mass_keys, stride)
    return out, [mass[b, :, : lengths[b]] if s.need_mass else None for b, s in enumerate(sets)]


def _padded_keys(q: Tensor, sets: Sequence[KeySet], lengths: list[int], longest: int) -> tuple[Tensor, Tensor]:
    """Every set's keys and values copied into [B, H, longest, D] buffers, right-padded with zeros."""
    H, D = q.shape[1], q.shape[3]
    # Only the padding is zeroed (a padded key is masked, but 0 x a garbage value could be NaN).
    keys = q.new_empty(len(sets), H, longest, D)
    values = q.new_empty(len(sets), H, longest, _segments(sets[0].v)[0].shape[2])
    for b, s in enumerate(sets):
        n = lengths[b]
        _write_segments(keys[b], s.k)
        _write_segments(values[b], s.v)
        if n < longest:
            keys[b, :, n:] = 0
            values[b, :, n:] = 0
    return keys, values
