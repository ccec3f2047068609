"""Procedural solid textures evaluated in torch (CPU or GPU).

Every texture maps a 3D point in an object's local frame to a weight ``w`` in [0, 1] that mixes the
object's two colours. Solid (3D) textures are used instead of UV maps so that one code path serves
planes, boxes and spheres, and a surface point keeps the same colour from every viewpoint, which is
what makes the frames usable for learning or testing correspondence.

The noise is integer-hash value noise: the hash uses only int64 multiplications, xors and shifts on
values kept below 2**31, so it never overflows and gives identical lattice values on CPU and CUDA.
"""

from __future__ import annotations

import torch

__all__ = ["TEXTURE_KINDS", "CHECKER", "STRIPES", "NOISE", "value_noise", "fbm", "texture_weight"]

CHECKER, STRIPES, NOISE = 0, 1, 2
TEXTURE_KINDS = {"checker": CHECKER, "stripes": STRIPES, "noise": NOISE}

_MASK31 = 0x7FFFFFFF
# Large odd multipliers (well-known spatial-hash primes); any distinct odd constants would do.
_PRIMES = (73856093, 19349663, 83492791)
# Lattice coordinates are shifted to be non-negative and masked to 21 bits before hashing.
_LATTICE_OFFSET = 1 << 20
_LATTICE_MASK = (1 << 21) - 1


def _hash3(ix: torch.Tensor, iy: torch.Tensor, iz: torch.Tensor, seed: torch.Tensor | int) -> torch.Tensor:
    """Hash integer lattice coordinates (int64) to floats in [0, 1)."""
    ix = (ix + _LATTICE_OFFSET) & _LATTICE_MASK
    iy = (iy + _LATTICE_OFFSET) & _LATTICE_MASK
    iz = (iz + _LATTICE_OFFSET) & _LATTICE_MASK
    h = (ix * _PRIMES[0]) ^ (iy * _PRIMES[1]) ^ (iz * _PRIMES[2])
    h = (h ^ (seed * 2654435 + 12345)) & _MASK31
    # Two rounds of xor-shift-multiply so neighbouring cells decorrelate; products stay < 2**62.
    h = ((h ^ (h >> 15)) * 1274126177) & _MASK31
    h = ((h ^ (h >> 13)) * 1911520717) & _MASK31
    h = h ^ (h >> 16)
    return h.to(torch.float32) * (1.0 / 2147483648.0)


def value_noise(points: torch.Tensor, seed: torch.Tensor | int) -> torch.Tensor:
    """Smooth 3D value noise in [0, 1] at ``points`` ``[N, 3]`` (lattice spacing 1)."""
    cell = torch.floor(points)
    frac = points - cell
    cell = cell.to(torch.int64)
    # Smoothstep fade so the noise has continuous first derivatives across cell faces.
    fade = frac * frac * (3.0 - 2.0 * frac)
    out = torch.zeros(points.shape[:-1], device=points.device, dtype=torch.float32)
    for dx in (0, 1):
        wx = fade[..., 0] if dx else 1.0 - fade[..., 0]
        for dy in (0, 1):
            wy = fade[..., 1] if dy else 1.0 - fade[..., 1]
            for dz in (0, 1):
                wz = fade[..., 2] if dz else 1.0 - fade[..., 2]
                corner = _hash3(cell[..., 0] + dx, cell[..., 1] + dy, cell[..., 2] + dz, seed)
                out = out + wx * wy * wz * corner
    return out


def fbm(points: torch.Tensor, seed: torch.Tensor | int, octaves: int = 3) -> torch.Tensor:
    """Fractal sum of ``octaves`` value-noise layers, normalised back to [0, 1]."""
    total = torch.zeros(points.shape[:-1], device=points.device, dtype=torch.float32)
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        total = total + amplitude * value_noise(points * (2.0**octave), seed + 101 * octave)
        norm += amplitude
        amplitude *= 0.5
    return total / norm


def texture_weight(
    kind: torch.Tensor,
    local_points: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    direction: torch.Tensor,
    noise_seed: torch.Tensor,
) -> torch.Tensor:
    """Colour-mixing weight in [0, 1] for surface points ``[N, 3]`` given per-point texture params.

    Args:
        kind: ``[N]`` int64, one of CHECKER, STRIPES, NOISE.
        local_points: ``[N, 3]`` points in the object's local frame (metres).
        scale: ``[N]`` cell size / stripe period / noise feature size (metres).
        offset: ``[N, 3]`` texture-space offset (keeps cell edges off flat faces).
        direction: ``[N, 3]`` unit stripe direction (ignored by other kinds).
        noise_seed: ``[N]`` int64 hash seed for the noise kind.
    """
    p = local_points / scale.unsqueeze(-1) + offset
    weight = torch.zeros(p.shape[0], device=p.device, dtype=torch.float32)
    is_checker = kind == CHECKER
    if bool(is_checker.any()):
        cells = torch.floor(p[is_checker]).to(torch.int64).sum(dim=-1)
        weight[is_checker] = (cells % 2).to(torch.float32)
    is_stripes = kind == STRIPES
    if bool(is_stripes.any()):
        phase = (p[is_stripes] * direction[is_stripes]).sum(dim=-1)
        weight[is_stripes] = (torch.floor(phase).to(torch.int64) % 2).to(torch.float32)
    is_noise = kind == NOISE
    if bool(is_noise.any()):
        n = fbm(p[is_noise], noise_seed[is_noise])
        # Value noise clusters around 0.5; stretch the contrast so both colours really appear.
        weight[is_noise] = ((n - 0.5) * 2.5 + 0.5).clamp(0.0, 1.0)
    return weight
