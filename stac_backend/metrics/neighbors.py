"""Deterministic subsampling and exact nearest neighbours by blocked distance matrices.

No KD-tree library is used. Small problems are solved by brute force (``torch.cdist`` on CPUs, a
float64 GEMM on GPUs), in blocks that bound the distance matrix's memory. Large ones (3D points) are pruned first, still exactly:

1. queries and references are sorted along a Morton (Z-order) curve, so a block of consecutive
   queries is spatially compact;
2. each query's distance to a few references near it on the curve is an upper bound ``ub`` of its
   true nearest-neighbour distance;
3. only references inside the block's bounding box grown by ``max(ub)`` can be nearest neighbours;
   they lie in one slice of the sorted references (Z-order is monotone in each coordinate), and
   the block's cdist runs against those alone.

For scene-sized clouds this is 10-100x faster than brute force on a 2-core CPU; on an H100 brute
force wins up to ~3e10 pairs, and pruning beyond (e.g. 20k queries against 61M references).
Distance matrices are computed so that nearly identical points are told apart (direct differences
on CPUs, float64 on centred coordinates on GPUs), and the distance to the chosen neighbour is
recomputed directly, so identical clouds give exactly 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["subsample_indices", "subsample", "nearest_neighbors", "DEFAULT_BLOCK_ELEMENTS"]

# Distance-matrix elements per block: 2**24 values = 64 MB in float32 (CPU), 128 MB in float64 (GPU).
DEFAULT_BLOCK_ELEMENTS = 1 << 24
# Up to this many query x reference pairs brute force is used (pruning has a per-block Python cost).
# Measured crossovers: ~2**24 on a 2-core CPU; on an H100 brute force did 10k x 100k in 14 ms (pruned
# 185 ms) and 20k x 2M in 0.87 s (pruned 1.16 s).
_BRUTE_FORCE_PAIRS_CPU = 1 << 24
_BRUTE_FORCE_PAIRS_CUDA = 1 << 35
_QUERY_BLOCK = 128  # queries per pruned block (spatially compact after the Morton sort)
_COARSE_POINTS = 256  # global reference subset for the upper bounds
_CURVE_NEIGHBOURS = 4  # references on each side along the Z-order curve for the upper bounds
_SPLIT_WORK = 1 << 22  # blocks facing more query x slice pairs than this may be split
_MORTON_BITS = 10  # per axis
_MORTON_MAX = (1 << _MORTON_BITS) - 1
_MASK31 = 0x7FFFFFFF


def _hash31(values: torch.Tensor, seed: int) -> torch.Tensor:
    """31-bit integer hash of int64 ``values`` (< 2**31); products stay below 2**63, no overflow."""
    h = (values ^ ((seed * 2654435761 + 0x5BD1E995) & _MASK31)) & _MASK31
    h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & _MASK31
    h = ((h ^ (h >> 12)) * 0x297A2D39) & _MASK31
    return h ^ (h >> 15)


def _feistel(x: torch.Tensor, half_bits: int, seed: int) -> torch.Tensor:
    """A pseudo-random bijection of ``[0, 4**half_bits)`` (4-round Feistel network on int64)."""
    mask = (1 << half_bits) - 1
    left, right = x >> half_bits, x & mask
    for round_ in range(4):
        left, right = right, left ^ (_hash31(right, seed * 4 + round_) & mask)
    return (left << half_bits) | right


def subsample_indices(
    num_points: int, max_points: int | None, *, seed: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor | None:
    """Sorted indices of a deterministic random subset of ``max_points`` out of ``num_points``.

    Returns ``None`` when no subsampling is needed. The subset is the image of ``0..max_points-1``
    under a seeded pseudo-random permutation of ``0..num_points-1`` (a Feistel network with cycle
    walking), so it costs O(max_points) rather than O(num_points) (``randperm`` of tens of millions
    of points takes about a second on a CPU), is the same on every device, and is nested: with one
    seed a smaller sample is contained in a larger one, so pixel-aligned clouds subsampled to
    different caps keep their pairs.
    """
    if max_points is None or num_points <= max_points:
        return None
    if max_points <= 0:
        raise ValueError(f"max_points must be positive, got {max_points}")
    if num_points > 1 << 32:
        raise ValueError(f"subsample_indices supports at most 2**32 points, got {num_points}")
    half_bits = max(1, math.ceil(math.log2(num_points) / 2))
    values = _feistel(torch.arange(max_points, device=device, dtype=torch.int64), half_bits, seed)
    # Cycle walking: values outside [0, num_points) go through the permutation again until they
    # land inside; the domain is < 4 * num_points, so few rounds are needed.
    outside = values >= num_points
    while bool(outside.any()):
        values[outside] = _feistel(values[outside], half_bits, seed)
        outside = values >= num_points
    return values.sort().values


def subsample(points: torch.Tensor, max_points: int | None, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(points[index], index)`` for ``index = subsample_indices(...)``; ``(points, None)`` if not needed."""
    index = subsample_indices(points.shape[0], max_points, seed=seed, device=points.device)
    return (points if index is None else points[index]), index


def _brute_force(query: torch.Tensor, reference: torch.Tensor, block_elements: int) -> torch.Tensor:
    """Index of the nearest reference for each query, distance matrices in query blocks."""
    block = max(1, block_elements // max(1, reference.shape[0]))
    out = torch.empty(query.shape[0], dtype=torch.int64, device=query.device)
    if query.is_cuda:
        # On GPUs cdist's direct mode is slow (~1e9 pairs/s on an H100); a float64 GEMM on centred
        # coordinates is fast and still exact enough to separate points 1e-6 apart.
        center = reference.mean(dim=0, keepdim=True)
        q64 = (query - center).to(torch.float64)
        r64 = (reference - center).to(torch.float64)
        r_norm = (r64 * r64).sum(dim=1)
        for start in range(0, query.shape[0], block):
            stop = min(start + block, query.shape[0])
            # |q - r|^2 = |q|^2 + |r|^2 - 2 q.r, and |q|^2 does not change the argmin over r.
            out[start:stop] = torch.addmm(r_norm.unsqueeze(0), q64[start:stop], r64.T, alpha=-2.0).argmin(dim=1)
        return out
    for start in range(0, query.shape[0], block):
        stop = min(start + block, query.shape[0])
        # On CPUs the direct-difference mode is as fast as the |x|^2 + |y|^2 - 2 x.y form for 3D
        # points, and exact for nearly identical points.
        d = torch.cdist(query[start:stop], reference, compute_mode="donot_use_mm_for_euclid_dist")
        out[start:stop] = d.argmin(dim=1)
    return out


def _spread_bits(v: torch.Tensor) -> torch.Tensor:
    """Insert two zero bits between the 10 low bits of ``v`` (int64), for 3D interleaving."""
    v = (v ^ (v << 16)) & 0xFF0000FF
    v = (v ^ (v << 8)) & 0x0300F00F
    v = (v ^ (v << 4)) & 0x030C30C3
    return (v ^ (v << 2)) & 0x09249249


def _morton_codes(points: torch.Tensor, lo: torch.Tensor, extent: torch.Tensor) -> torch.Tensor:
    """Z-order codes of 3D points on a ``2**_MORTON_BITS`` grid per axis over a cube."""
    cells = ((points - lo) / extent * _MORTON_MAX).round().clamp(0, _MORTON_MAX).to(torch.int64)
    return _spread_bits(cells[:, 0]) | (_spread_bits(cells[:, 1]) << 1) | (_spread_bits(cells[:, 2]) << 2)


def _corner_code(corner: list[float], lo: list[float], extent: float, upper: bool) -> int:
    """Z-order code of a box corner, rounded outwards by one cell.

    Rounding outwards keeps ``code(low corner) <= code(p) <= code(high corner)`` for every point
    ``p`` in the box even though the points' codes were computed in their own (e.g. float32)
    precision on the device.
    """
    code = 0
    for axis in range(3):
        x = (corner[axis] - lo[axis]) / extent * _MORTON_MAX
        cell = math.ceil(x) + 1 if upper else math.floor(x) - 1
        cell = min(max(cell, 0), _MORTON_MAX)
        for bit in range(_MORTON_BITS):
            code |= ((cell >> bit) & 1) << (3 * bit + axis)
    return code


def _upper_bounds(query: torch.Tensor, sorted_refs: torch.Tensor, positions: torch.Tensor, coarse: torch.Tensor,
                  block_elements: int) -> torch.Tensor:
    """Per-query upper bound of the nearest-neighbour distance.

    The exact distance to *any* reference is an upper bound. Two cheap candidate sets: the few
    references next to the query along the Z-order curve (usually very close, so tight bounds) and a
    small global subset (guards the rare query whose curve neighbours are far away).
    """
    offsets = torch.arange(-_CURVE_NEIGHBOURS, _CURVE_NEIGHBOURS, device=query.device)
    near = (positions.unsqueeze(1) + offsets).clamp(0, sorted_refs.shape[0] - 1)
    curve = (query.unsqueeze(1) - sorted_refs[near]).norm(dim=-1).amin(dim=1)
    global_ = (query - coarse[_brute_force(query, coarse, block_elements)]).norm(dim=-1)
    # Relative and absolute margins absorb float rounding of the distances themselves.
    return torch.minimum(curve, global_) * (1.0 + 1e-6) + 1e-7


def _pruned(query: torch.Tensor, reference: torch.Tensor, block_elements: int) -> torch.Tensor:
    """Exact nearest-reference indices using Morton-sorted blocks and box pruning."""
    out = torch.empty(query.shape[0], dtype=torch.int64, device=query.device)
    lo = torch.minimum(query.min(dim=0).values, reference.min(dim=0).values)
    extent = (torch.maximum(query.max(dim=0).values, reference.max(dim=0).values) - lo).max().clamp_min(1e-12)
    query_codes = _morton_codes(query, lo, extent)
    ref_codes, ref_order = _morton_codes(reference, lo, extent).sort()
    sorted_refs = reference[ref_order]
    coarse_index = subsample_indices(reference.shape[0], _COARSE_POINTS, seed=12345, device=reference.device)
    coarse = reference if coarse_index is None else reference[coarse_index]
    bounds = _upper_bounds(query, sorted_refs, torch.searchsorted(ref_codes, query_codes), coarse, block_elements)

    query_order = query_codes.argsort()
    # Box corners are handled as Python numbers and the slice bounds found with numpy, so a block
    # costs the device only two synchronisations (its box, and the candidates' count).
    lo_list, extent_value = lo.tolist(), float(extent)
    ref_codes_host = ref_codes.cpu().numpy()
    # A stack of query blocks, contiguous along the curve. A block spread much wider than its bound
    # (it straddles a jump of the curve, or its queries are sparse among dense references) and with
    # much work ahead is split in two rather than searched as one big box.
    work = [query_order[start : start + _QUERY_BLOCK] for start in range(0, query.shape[0], _QUERY_BLOCK)]
    while work:
        rows = work.pop()
        q = query[rows]
        bound = bounds[rows].max()
        box = torch.cat([q.min(dim=0).values - bound, q.max(dim=0).values + bound, bound.reshape(1)]).tolist()
        low, high, bound_value = box[:3], box[3:6], box[6]
        # Z-order is monotone in every coordinate, so every reference inside the box has a code
        # between the codes of the box's corners: only that slice of the sorted references is tested.
        first = int(np.searchsorted(ref_codes_host, _corner_code(low, lo_list, extent_value, upper=False), "left"))
        last = int(np.searchsorted(ref_codes_host, _corner_code(high, lo_list, extent_value, upper=True), "right"))
        spread = max(h - l for h, l in zip(high, low))
        if rows.numel() > 8 and spread > 8.0 * bound_value and rows.numel() * (last - first) > _SPLIT_WORK:
            half = rows.numel() // 2
            work += [rows[:half], rows[half:]]
            continue
        candidates = sorted_refs[first:last]
        inside = (
            (candidates[:, 0] >= low[0]) & (candidates[:, 0] <= high[0])
            & (candidates[:, 1] >= low[1]) & (candidates[:, 1] <= high[1])
            & (candidates[:, 2] >= low[2]) & (candidates[:, 2] <= high[2])
        ).nonzero().squeeze(1)
        if inside.numel() == 0:  # cannot happen with exact bounds; kept as a safe fallback
            out[rows] = _brute_force(q, reference, block_elements)
            continue
        nearest = inside[_brute_force(q, candidates[inside], block_elements)]
        out[rows] = ref_order[first + nearest]
    return out


def nearest_neighbors(
    query: torch.Tensor, reference: torch.Tensor, *, block_elements: int = DEFAULT_BLOCK_ELEMENTS, prune: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query point ``[N, D]`` its exact nearest reference point ``[M, D]``.

    Returns Euclidean distances ``[N]`` and reference indices ``[N]`` (int64). ``prune`` selects the
    pruned search (3D only); by default it is used when ``N * M`` is large.
    """
    if query.ndim != 2 or reference.ndim != 2 or query.shape[1] != reference.shape[1]:
        raise ValueError(f"expected [N, D] and [M, D], got {tuple(query.shape)} and {tuple(reference.shape)}")
    if reference.shape[0] == 0:
        raise ValueError("nearest_neighbors: the reference set is empty")
    if block_elements <= 0:
        raise ValueError(f"block_elements must be positive, got {block_elements}")
    dtype = torch.promote_types(query.dtype, reference.dtype)
    query, reference = query.to(dtype), reference.to(device=query.device, dtype=dtype)
    if query.shape[0] == 0:
        return query.new_zeros(0), torch.zeros(0, dtype=torch.int64, device=query.device)
    if prune is None:
        limit = _BRUTE_FORCE_PAIRS_CUDA if query.is_cuda else _BRUTE_FORCE_PAIRS_CPU
        prune = query.shape[1] == 3 and query.shape[0] * reference.shape[0] > limit
    if prune and query.shape[1] != 3:
        raise ValueError("the pruned search supports 3D points only")
    indices = _pruned(query, reference, block_elements) if prune else _brute_force(query, reference, block_elements)
    distances = (query - reference[indices]).norm(dim=-1)
    return distances, indices
