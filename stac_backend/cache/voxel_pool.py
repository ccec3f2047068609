"""STAC's long-term spatial token cache: a bounded, vectorised voxel pool (one per stream).

One module of ~1000 lines on purpose: insert, carry-over, merge, eviction, retrieval and the state
export share one set of tensors and their invariants (row keys, counts, LRU stamps); the GPU kernels
of the insert live in kernels/pool_kernels.py.

Tokens evicted from the hot (temporal) cache are not dropped: they are filed by the 3D position
of their patch into voxels and compressed there into a few merged "pivots" per
(layer, head, voxel). Before a step, pivots of voxels near the current view are retrieved and
appended to the hot keys/values with a logit bias ``log(C)``. See docs/stac.md.

Public API
----------
``VoxelPool(num_layers, num_heads, head_dim, *, voxel_size=0.05, buffer_size=8, max_pivots=4,
merge_cos=0.8, score_gate=0.2, max_voxels=4096, initial_voxels=256, carry_slots=8,
dtype=torch.float32, device="cpu")``

* ``VoxelPool.voxel_coords(points [N,3], conf [N], voxel_size=0.05, conf_threshold=2.0)``
  -> ``(coords LongTensor [N,3], valid BoolTensor [N])``; static.
* ``insert(layer, head [M], k [M,D], v [M,D], score [M], coords [M,3], step)`` -> None;
  ``layer`` is an int or a LongTensor [M], so one call files the tokens of every layer.
* ``retrieve(layer, query_coords [Q,3], max_tokens, step, radius=2, include_buffer=True)``
  -> ``(k [H,T,D], v [H,T,D], bias [H,T] float32, valid [H,T] bool)``;
  ``retrieve_layers(layers, ...)`` -> the same for several layers in one batched pass.
* ``memory_bytes()`` -> bytes of every tensor the pool holds (exact, including the voxel table).
* ``VoxelPool.bytes_for(max_voxels, num_layers, num_heads, head_dim, dtype, buffer_size=8,
  max_pivots=4, carry_slots=8)`` -> the most ``memory_bytes()`` can ever be; static.
* ``contains(coords [N,3])`` -> BoolTensor [N], which voxels are held.
* ``num_voxels`` / ``capacity`` (properties) and ``stats()`` -> dict of counters.

Storage
-------
One voxel table per stream (packed voxel key -> row index, plus the last step each row was
used), shared by every layer and head: row ``r`` is the same voxel in every (layer, head).
Per-row data are dense tensors with a voxel axis of the current capacity:

* pivots: ``piv_k/piv_v [L, H, V, P, D]`` (pool dtype), ``piv_w/piv_s/piv_c [L, H, V, P]``
  (float32; a slot holds a pivot iff ``piv_c > 0``);
* buffers: ``buf_k/buf_v [L, H, V, B, D]``, ``buf_s [L, H, V, B]`` float32,
  ``buf_n [L, H, V]`` int32 (slots ``0 .. buf_n-1`` are occupied, best score first);
* carried-over tokens: ``car_k/car_v [L, H, V, C, D]``, ``car_s [L, H, V, C]`` float32,
  ``car_n [L, H, V]`` int32 (``C = carry_slots``; slots ``0 .. car_n-1``, best score first);
* table: ``row_key [V]`` int64 (-1 = free row), ``row_last_used [V]`` int64.

Capacity starts at ``initial_voxels`` and doubles on demand up to ``max_voxels`` (growth copies
the tensors, so the transient peak during a growth is old + new). ``memory_bytes()`` is the sum
of ``nbytes`` of these tensors; ``bytes_for(max_voxels, ...)`` is the same sum at full
capacity, so a per-stream byte budget converts to ``max_voxels`` by dividing by
``bytes_for(1, ...)`` (the size is linear in ``max_voxels``).

Insertion semantics (one pass per call, vectorised over all (layer, head, voxel) rows)
-------------------------------------------------------------------------------------
Rows of different layers and heads never interact, so one call handles the tokens of every layer
(the pool tensors are viewed flat as ``[L*H*V, ...]``). A row's tokens are its new tokens in
arrival order followed by the tokens it carried over from the previous call (in carry order).
For every row touched by either:

1. If the row has at least one pivot, each token finds its most similar pivot (cosine between the
   token key and the normalised pivot key, pivots as of the start of the call; first maximum on
   ties). ``cos >= merge_cos`` -> merged into that pivot with weight ``a = exp(cos)``:
   ``K <- (W K + sum a_i k_i) / (W + sum a_i)``, V likewise, ``W += sum a_i``, ``S += sum s_i``,
   ``C += n``. A token that does not merge becomes a buffer candidate only if its score is above
   ``score_gate`` x the row's mean score per merged token (``sum S / sum C`` after this call's
   merges); else it is dropped (counted as gated).
2. If the row has no pivot, every token is a candidate.
3. The row's buffered tokens and its candidates are ranked by score (descending; ties: buffered
   first, then candidates in token order). The first ``buffer_size`` are the buffer (a buffered
   token can be pushed out by better new ones), the next ``carry_slots`` are carried over to the
   next call, the rest are dropped (counted as ``overflow_dropped_tokens``).
4. A full buffer collapses into one pivot: seed = the highest-score token (first on ties),
   ``a_i = exp(cos(k_i, k_seed))``, ``K = sum a_i k_i / sum a_i``, V likewise, ``W = sum a_i``,
   ``S = sum s_i``, ``C = buffer_size``. If the row already holds ``max_pivots`` pivots, its
   lowest-W pivot (first on ties) is first merged into its most similar sibling (cosine of
   pivot keys): the victim's weight is discounted to ``W_v' = W_v exp(cos - 1)``, then
   ``K = (W_v' K_v + W_n K_n) / (W_v' + W_n)``, V likewise, ``W = W_v' + W_n``, S and C add.
   The new pivot takes the freed slot (else the first free slot).

So a call costs one vectorised pass over its tokens whatever their distribution over voxels, and
what a row cannot absorb in one call waits (bounded) for the next. In torch ops (the CPU path)
an insert needs a constant number of host synchronisations (data-dependent sizes), independent of
the number of layers, rows and tokens; on CUDA one kernel (``kernels/pool_kernels.insert_rows``)
runs every touched row and keeps its counters on the device: it reads back only the number of
touched rows. Merging math is fp32; K/V are stored in the pool dtype.

Retrieval semantics (one batched pass for any number of layers)
-----------------------------------------------------------------
Candidate voxels are the voxels in the table within Chebyshev distance ``radius`` (in voxel
units) of any query voxel. Per head, their pivots are ranked by W (descending; ties by voxel
key, then slot) and up to ``max_tokens`` are returned with bias ``log(C)``. With
``include_buffer`` the candidates' buffered raw tokens, ranked by score, fill the rest of the
``max_tokens`` budget after the pivots, with bias 0. Per head the valid entries come first;
``T`` is the largest per-head count (<= ``max_tokens``); padding has ``valid=False``, zero K/V
and bias ``-inf``. The pass works on masks over every row of the table (fixed sizes), so it reads
back only the output lengths, once for all layers; with ``query_valid`` the queries need no
selection on the host either.

Eviction rule (hard cap ``max_voxels``)
--------------------------------------
When new voxels arrive and no free row is left at ``max_voxels``, whole voxel rows (all layers,
all heads, with their buffers and carried tokens) are evicted: **least recently used first**
(``row_last_used`` = the last ``step`` passed to an ``insert`` that put a token in the voxel or a
``retrieve`` that had it as a candidate), **ties broken by the lowest total W** (summed over
layers, heads and pivots), then by the lowest row index. Voxels referenced by the same ``insert``
call are never evicted by it. If even that leaves too few rows, the new voxels with the most
tokens in the call are admitted (ties: lowest voxel key) and the other tokens are dropped
(counted in ``stats()``).

Relation to the reference implementation (github.com/Rainzor/STAC)
-----------------------------------------------------------------
The rules above are those of its STAC mode (``voxel_backend="cuda"``: the kernels of
``merger-cuda/csrc/kernels/merger_kernels.cu``, driven by ``stac/merger.py``): tokens are
compared with the normalised pivot key (its Python back end compares with a stored seed key
instead), merge weight ``exp(cos)``, gate ``score > 0.2 x row mean S/C`` after the merges, the
buffer's top-by-score update over old and new tokens, carry-over of what does not fit, the
victim discount ``exp(cos - 1)``. Differences, for a server: the carry-over is capped per row
(the reference's grows without bound), the pool has a hard voxel cap with the eviction rule above
(the reference grows without bound), and retrieval returns only as many slots as the widest head
needs (the reference pads a fixed ``max_tokens``; the padding is never attended). See docs/stac.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.pool_kernels import INSERT_COUNTERS, insert_rows, kernels_apply

__all__ = ["VoxelPool"]

# Voxel coordinates are packed into one int64 key: 21 bits per axis, offset by 2**20.
_BITS = 21
_OFFSET = 1 << 20
_MAX_RADIUS = 64
# Keep |coord| small enough that coord +/- radius never leaves the 21-bit field, so neighbour
# keys can be formed by adding packed offsets.
_COORD_LIMIT = _OFFSET - 1 - _MAX_RADIUS
_EPS = 1e-6
# Tokens per chunk when comparing tokens with their row's pivots ([chunk, P, D] fp32 gathered).
_TOKEN_CHUNK = 1 << 16
_DROPPED = torch.iinfo(torch.int64).max  # sort key of tokens whose voxel found no row


def _pack(coords: Tensor) -> Tensor:
    """Pack integer voxel coords [N, 3] into int64 keys [N] (monotone per axis)."""
    c = coords.to(torch.int64) + _OFFSET
    return c[:, 0] | (c[:, 1] << _BITS) | (c[:, 2] << (2 * _BITS))


@dataclass(frozen=True)
class _Field:
    """One stored tensor: shape = lead + (V,) + tail."""

    lead: tuple[int, ...]
    tail: tuple[int, ...]
    dtype: torch.dtype
    fill: float = 0


def _field_specs(
    num_layers: int,
    num_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    buffer_size: int,
    max_pivots: int,
    carry_slots: int = 8,
) -> dict[str, _Field]:
    """Every tensor the pool holds; used both to allocate and to compute bytes_for()."""
    LH = (num_layers, num_heads)
    P, B, D, C = max_pivots, buffer_size, head_dim, carry_slots
    return {
        "piv_k": _Field(LH, (P, D), dtype),
        "piv_v": _Field(LH, (P, D), dtype),
        "piv_w": _Field(LH, (P,), torch.float32),
        "piv_s": _Field(LH, (P,), torch.float32),
        "piv_c": _Field(LH, (P,), torch.float32),
        "buf_k": _Field(LH, (B, D), dtype),
        "buf_v": _Field(LH, (B, D), dtype),
        "buf_s": _Field(LH, (B,), torch.float32),
        "buf_n": _Field(LH, (), torch.int32),
        "car_k": _Field(LH, (C, D), dtype),
        "car_v": _Field(LH, (C, D), dtype),
        "car_s": _Field(LH, (C,), torch.float32),
        "car_n": _Field(LH, (), torch.int32),
        "row_key": _Field((), (), torch.int64, fill=-1),
        "row_last_used": _Field((), (), torch.int64, fill=-1),
    }


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class VoxelPool:
    """Bounded per-stream voxel pool of merged key/value pivots (see module docstring)."""

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        *,
        voxel_size: float = 0.05,
        buffer_size: int = 8,
        max_pivots: int = 4,
        merge_cos: float = 0.8,
        score_gate: float = 0.2,
        max_voxels: int = 4096,
        initial_voxels: int = 256,
        carry_slots: int = 8,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        self.num_layers = _check_int("num_layers", num_layers, 1)
        self.num_heads = _check_int("num_heads", num_heads, 1)
        self.head_dim = _check_int("head_dim", head_dim, 1)
        self.buffer_size = _check_int("buffer_size", buffer_size, 1)
        # A full row needs a sibling to merge its weakest pivot into.
        self.max_pivots = _check_int("max_pivots", max_pivots, 2)
        self.max_voxels = _check_int("max_voxels", max_voxels, 1)
        self.carry_slots = _check_int("carry_slots", carry_slots, 0)
        initial_voxels = _check_int("initial_voxels", initial_voxels, 1)
        if not (isinstance(voxel_size, (int, float)) and math.isfinite(voxel_size) and voxel_size > 0):
            raise ValueError(f"voxel_size must be a finite float > 0, got {voxel_size!r}")
        if not (isinstance(merge_cos, (int, float)) and -1.0 <= merge_cos <= 1.0):
            raise ValueError(f"merge_cos must be in [-1, 1], got {merge_cos!r}")
        if not (isinstance(score_gate, (int, float)) and math.isfinite(score_gate) and score_gate >= 0):
            raise ValueError(f"score_gate must be a finite float >= 0, got {score_gate!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.voxel_size = float(voxel_size)
        self.merge_cos = float(merge_cos)
        self.score_gate = float(score_gate)
        self.dtype = dtype
        self.device = torch.device(device)

        self._specs = _field_specs(
            num_layers, num_heads, head_dim, dtype, buffer_size, max_pivots, carry_slots
        )
        self._cap = 0
        self._tensors: dict[str, Tensor] = {}
        self._grow(min(initial_voxels, self.max_voxels))

        # Counters are host ints updated from sizes the host already knows (no extra syncs).
        self._evicted_voxels = 0
        self._evicted_pivots = 0
        self._inserted_tokens = 0
        self._merged_tokens = 0
        self._gated_tokens = 0
        self._capacity_dropped_tokens = 0
        self._overflow_dropped_tokens = 0
        self._pivots_created = 0
        self._insert_calls = 0
        # Inserts through the kernel count on the device (merged, gated, pivots created, carried
        # tokens dropped at the carry cap): no synchronisation per insert.
        self._kernel_counts: Tensor | None = None
        self._layer_indices: dict[tuple[int, ...], Tensor] = {}  # retrieve_layers' layer lists on the device

    # ------------------------------------------------------------------ sizes and memory
    @staticmethod
    def bytes_for(
        max_voxels: int,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        buffer_size: int = 8,
        max_pivots: int = 4,
        carry_slots: int = 8,
    ) -> int:
        """Largest ``memory_bytes()`` of a pool with these settings (at full capacity)."""
        _check_int("max_voxels", max_voxels, 0)
        specs = _field_specs(num_layers, num_heads, head_dim, dtype, buffer_size, max_pivots, carry_slots)
        total = 0
        for f in specs.values():
            total += math.prod(f.lead) * max_voxels * math.prod(f.tail) * _itemsize(f.dtype)
        return total

    def memory_bytes(self) -> int:
        """Exact bytes of every tensor the pool currently holds."""
        return sum(t.nbytes for t in self._tensors.values())

    @property
    def capacity(self) -> int:
        """Rows currently allocated (grows up to ``max_voxels``)."""
        return self._cap

    @property
    def num_voxels(self) -> int:
        """Voxels currently held in the table."""
        return int((self._tensors["row_key"] >= 0).sum())

    def stats(self) -> dict[str, int]:
        """Counters for monitoring: occupancy, evictions and token fates."""
        t = self._tensors
        pivots = int((t["piv_c"] > 0).sum())
        dev = self._kernel_counts.tolist() if self._kernel_counts is not None else [0] * len(INSERT_COUNTERS)
        merged, gated, created, overflow = dev
        created += self._pivots_created
        return {
            "voxels": self.num_voxels,
            "capacity": self._cap,
            "max_voxels": self.max_voxels,
            "pivots": pivots,
            "buffered_tokens": int(t["buf_n"].sum()),
            "carried_tokens": int(t["car_n"].sum()),
            "evicted_voxels": self._evicted_voxels,
            "inserted_tokens": self._inserted_tokens,
            "merged_tokens": self._merged_tokens + merged,
            "gated_tokens": self._gated_tokens + gated,
            "capacity_dropped_tokens": self._capacity_dropped_tokens,
            "overflow_dropped_tokens": self._overflow_dropped_tokens + overflow,
            "pivots_created": created,
            # Every collapse adds a pivot to its row unless the row was full, where a sibling
            # merge removed one first; so merges = created - alive - evicted with their voxels.
            "sibling_merges": created - pivots - self._evicted_pivots,
            "insert_calls": self._insert_calls,
            "memory_bytes": self.memory_bytes(),
        }

    def _grow(self, new_cap: int) -> None:
        """Reallocate every field with ``new_cap`` rows, keeping the existing rows."""
        for name, f in self._specs.items():
            shape = f.lead + (new_cap,) + f.tail
            new = torch.full(shape, f.fill, dtype=f.dtype, device=self.device)
            old = self._tensors.get(name)
            if old is not None:
                new.narrow(len(f.lead), 0, self._cap).copy_(old)
            self._tensors[name] = new
        self._cap = new_cap

    # Flat views over (layer, head, row): index g = (layer * num_heads + head) * capacity + row.
    # Rows of different layers and heads are independent, so one vectorised pass serves them all.
    def _fv(self, name: str) -> Tensor:
        t = self._tensors[name]
        return t.view((self.num_layers * self.num_heads * self._cap,) + tuple(t.shape[3:]))

    # ------------------------------------------------------------------ coordinates
    @staticmethod
    def voxel_coords(
        points: Tensor,
        conf: Tensor,
        voxel_size: float = 0.05,
        conf_threshold: float = 2.0,
    ) -> tuple[Tensor, Tensor]:
        """Voxel coordinates ``floor(xyz / voxel_size)`` and which points may be pooled.

        A point is valid iff its xyz and confidence are finite, ``conf > conf_threshold`` and
        its voxel coordinate fits the packed key range (|coord| < ~2**20). Invalid rows get
        coordinate (0, 0, 0); use the mask.
        """
        if not isinstance(points, Tensor) or points.dim() != 2 or points.shape[1] != 3:
            raise ValueError(f"points must be [N, 3], got {getattr(points, 'shape', points)!r}")
        if not points.is_floating_point():
            raise ValueError(f"points must be floating point, got {points.dtype}")
        if not isinstance(conf, Tensor) or conf.shape != points.shape[:1]:
            raise ValueError(
                f"conf must be [N]={tuple(points.shape[:1])}, got {getattr(conf, 'shape', conf)!r}"
            )
        if not (isinstance(voxel_size, (int, float)) and math.isfinite(voxel_size) and voxel_size > 0):
            raise ValueError(f"voxel_size must be a finite float > 0, got {voxel_size!r}")
        # Divide in the points' own precision (at least fp32) by the voxel size rounded to that
        # precision, as the reference does: a point written as exactly k * voxel_size in that
        # dtype then lands in voxel k (fp64 division would put -0.05f in voxel -2).
        dt = torch.promote_types(points.dtype, torch.float32)
        q = torch.floor(points.to(dt) / torch.tensor(float(voxel_size), dtype=dt))
        valid = torch.isfinite(q).all(dim=1) & torch.isfinite(conf) & (conf > conf_threshold)
        valid &= (q.abs() <= _COORD_LIMIT).all(dim=1)
        coords = torch.where(valid[:, None], q, torch.zeros_like(q)).to(torch.int64)
        return coords, valid

    def _keys(self, coords: Tensor, name: str, check_range: bool = True) -> Tensor:
        if coords.dim() != 2 or coords.shape[1] != 3:
            raise ValueError(f"{name} must be [N, 3], got {tuple(coords.shape)}")
        if coords.is_floating_point() or coords.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {coords.dtype}")
        coords = coords.to(self.device, torch.int64)
        if check_range and coords.numel() and bool((coords.abs() > _COORD_LIMIT).any()):
            raise ValueError(f"{name} outside the supported range |coord| <= {_COORD_LIMIT}")
        return _pack(coords)

    def contains(self, coords: Tensor) -> Tensor:
        """BoolTensor [N]: which voxel coordinates [N, 3] are currently held in the table."""
        return self._lookup(self._keys(coords, "coords")) >= 0

    def _lookup(self, keys: Tensor) -> Tensor:
        """Row index of each key, -1 if the voxel is not in the table."""
        sorted_keys, order = torch.sort(self._tensors["row_key"])  # free rows (-1) sort first
        pos = torch.searchsorted(sorted_keys, keys).clamp_max(self._cap - 1)
        hit = sorted_keys[pos] == keys
        return torch.where(hit, order[pos], torch.full_like(pos, -1))

    # ------------------------------------------------------------------ table management
    def _clear_rows(self, rows: Tensor) -> None:
        t = self._tensors
        # index_fill_, not ``t[...][rows] = 0``: a scalar written through advanced indexing is
        # copied host -> device first, a synchronisation each.
        for name in ("piv_w", "piv_s", "piv_c", "buf_s", "buf_n", "car_s", "car_n"):
            t[name].index_fill_(2, rows, 0)
        t["row_key"].index_fill_(0, rows, -1)
        t["row_last_used"].index_fill_(0, rows, -1)

    def _evict(self, n: int, protect: Tensor) -> None:
        """Evict up to ``n`` rows: least recently used, then lowest total W, then lowest row."""
        t = self._tensors
        cand = t["row_key"] >= 0
        cand[protect] = False
        idx = cand.nonzero().squeeze(1)
        if idx.numel() == 0 or n <= 0:
            return
        total_w = t["piv_w"].sum(dim=(0, 1, 3))[idx]
        last = t["row_last_used"][idx]
        # Lexicographic (last, total_w, row) through stable sorts, least significant first;
        # idx is already ascending.
        order = torch.argsort(total_w, stable=True)
        order = order[torch.argsort(last[order], stable=True)]
        victims = idx[order[:n]]
        self._evicted_pivots += int((t["piv_c"][:, :, victims] > 0).sum())
        self._clear_rows(victims)
        self._evicted_voxels += int(victims.numel())

    def _resolve_rows(self, keys: Tensor, step: int) -> Tensor:
        """Row per token, admitting new voxels (growing / evicting); -1 = token dropped."""
        t = self._tensors
        uniq, inv, counts = torch.unique(keys, return_inverse=True, return_counts=True)
        rows_u = self._lookup(uniq)
        new = rows_u < 0
        n_new = int(new.sum())
        if n_new:
            free = (t["row_key"] < 0).nonzero().squeeze(1)
            if free.numel() < n_new and self._cap < self.max_voxels:
                used = self._cap - free.numel()
                self._grow(min(self.max_voxels, max(2 * self._cap, used + n_new)))
                t = self._tensors
                free = (t["row_key"] < 0).nonzero().squeeze(1)
            if free.numel() < n_new:
                self._evict(n_new - free.numel(), rows_u[~new])
                free = (t["row_key"] < 0).nonzero().squeeze(1)
            new_idx = new.nonzero().squeeze(1)
            if free.numel() < n_new:
                # Admit the voxels that bring the most tokens (stable: ties -> smaller key).
                order = torch.argsort(-counts[new_idx], stable=True)
                dropped = new_idx[order[free.numel():]]
                self._capacity_dropped_tokens += int(counts[dropped].sum())
                new_idx = torch.sort(new_idx[order[: free.numel()]]).values
            take = free[: new_idx.numel()]
            t["row_key"][take] = uniq[new_idx]
            rows_u[new_idx] = take
        present = rows_u[rows_u >= 0]
        t["row_last_used"].index_fill_(0, present, step)
        return rows_u[inv]

    # ------------------------------------------------------------------ insertion
    def insert(
        self,
        layer: int | Tensor,
        head: Tensor,
        k: Tensor,
        v: Tensor,
        score: Tensor,
        coords: Tensor,
        step: int,
        *,
        check_values: bool = True,
    ) -> None:
        """File ``M`` evicted tokens into their voxels (see module docstring).

        Args:
            layer: global-attention layer of the tokens: an int in ``[0, num_layers)``, or a
                LongTensor [M] (one layer per token) to file every layer's tokens in one call,
                which is what ``StacCache`` does once per step.
            head: LongTensor [M], head of each token.
            k, v: [M, D] keys / values.
            score: [M] the tokens' (decayed cumulative attention) scores.
            coords: LongTensor [M, 3] voxel coordinates (from ``voxel_coords``; pass only
                valid tokens).
            step: current stream step, used for least-recently-used eviction.
            check_values: False skips the range checks of ``layer``, ``head`` and ``coords``
                values (shapes and dtypes are still checked). Each is a device->host
                synchronisation; a caller that built the values in range (``StacCache``) skips them.
        """
        D = self.head_dim
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"step must be an int, got {step!r}")
        if not isinstance(head, Tensor) or head.dim() != 1:
            raise ValueError(f"head must be a 1-D integer tensor [M], got {getattr(head, 'shape', head)!r}")
        M = head.shape[0]
        if head.is_floating_point() or head.dtype == torch.bool:
            raise ValueError(f"head must be an integer tensor, got {head.dtype}")
        layers = self._layer_ids(layer, M, check_values)
        for name, t, shape in (("k", k, (M, D)), ("v", v, (M, D)), ("score", score, (M,))):
            if not isinstance(t, Tensor) or tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {getattr(t, 'shape', t)!r}")
        if not isinstance(coords, Tensor) or tuple(coords.shape) != (M, 3):
            raise ValueError(f"coords must have shape {(M, 3)}, got {getattr(coords, 'shape', coords)!r}")
        head = head.to(self.device, torch.int64)
        if check_values and M and bool(((head < 0) | (head >= self.num_heads)).any()):
            raise ValueError(f"head values must be in [0, {self.num_heads})")
        keys = self._keys(coords, "coords", check_range=check_values)
        if M == 0:
            return
        self._inserted_tokens += M
        self._insert_calls += 1

        rows = self._resolve_rows(keys, step)  # may grow the pool: flat indices use the new capacity
        g = (layers * self.num_heads + head) * self._cap + rows
        # Group tokens by row, keeping arrival order inside a row; tokens of voxels refused at the
        # cap (rows -1, already counted as capacity-dropped) sort last and are cut off. From here
        # on a token is its position in these sorted arrays: ascending = (row, arrival) order.
        n_keep = int((rows >= 0).sum())
        order = torch.argsort(torch.where(rows >= 0, g, torch.full_like(g, _DROPPED)), stable=True)[:n_keep]
        g = g[order]
        s = score.to(self.device, torch.float32)[order]
        # Keys and values are not permuted (two [M, D] copies): position i reads row src[i].
        src = order
        k, v = k.to(self.device), v.to(self.device)

        if kernels_apply(k):
            # one program per touched row (new or carried tokens); counters stay on the device
            piv = {name: self._fv(name) for name in ("piv_k", "piv_v", "piv_w", "piv_s", "piv_c")}
            buf = {name: self._fv(name) for name in ("buf_k", "buf_v", "buf_s", "buf_n")}
            car = {name: self._fv(name) for name in ("car_k", "car_v", "car_s", "car_n")}
            found = insert_rows(k, v, src, g, s, piv, buf, car, self.merge_cos, self.score_gate, _EPS)
            self._add_kernel_counts(found)
            return
        g, k, v, s, src = self._with_carried(g, k, v, s, src)
        pending = torch.arange(g.numel(), device=self.device)
        cand, n_merged = self._merge_and_gate(g, k, v, s, src, pending)
        self._gated_tokens += pending.numel() - n_merged - cand.numel()
        if cand.numel():
            self._fill_buffers(g, k, v, s, src, cand)

    def _add_kernel_counts(self, found: Tensor) -> None:
        """Accumulate ``insert_rows``' counters on the device (read only by ``stats()``)."""
        if self._kernel_counts is None:
            self._kernel_counts = torch.zeros(len(INSERT_COUNTERS), dtype=torch.int64, device=self.device)
        self._kernel_counts += found

    def _with_carried(self, g: Tensor, k: Tensor, v: Tensor, s: Tensor, src: Tensor) -> tuple[Tensor, ...]:
        """The call's tokens followed, in each row, by the tokens that row carried over from the
        previous insert (in their carry order); the carry slots are emptied."""
        C, D = self.carry_slots, self.head_dim
        if C == 0:
            return g, k, v, s, src
        cn = self._fv("car_n")
        rows = (cn > 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            return g, k, v, s, src
        slots = torch.arange(C, device=self.device)
        held = slots < cn[rows].to(torch.int64)[:, None]  # [r, C]
        flat = (rows[:, None] * C + slots)[held]  # row by row, slot order
        cg = rows[:, None].expand(-1, C)[held]
        ck = self._fv("car_k").view(-1, D)[flat].to(k.dtype)
        cv = self._fv("car_v").view(-1, D)[flat].to(v.dtype)
        cs = self._fv("car_s").view(-1)[flat]
        cn.index_fill_(0, rows, 0)
        n_new = k.shape[0]
        k, v = torch.cat([k, ck]), torch.cat([v, cv])
        g, s = torch.cat([g, cg]), torch.cat([s, cs])
        src = torch.cat([src, n_new + torch.arange(cg.numel(), device=self.device)])
        order = torch.argsort(g, stable=True)  # new tokens stay before carried ones in a row
        return g[order], k, v, s[order], src[order]

    def _layer_ids(self, layer: int | Tensor, M: int, check_values: bool = True) -> Tensor:
        """The layer of every token as a LongTensor [M] on the pool's device (validated)."""
        L = self.num_layers
        if isinstance(layer, Tensor):
            if layer.dim() != 1 or layer.shape[0] != M or layer.is_floating_point() or layer.dtype == torch.bool:
                raise ValueError(f"layer must be an int or an integer tensor [{M}], got {layer.dtype} {tuple(layer.shape)}")
            layer = layer.to(self.device, torch.int64)
            if check_values and M and bool(((layer < 0) | (layer >= L)).any()):
                raise ValueError(f"layer values must be in [0, {L})")
            return layer
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < L:
            raise ValueError(f"layer must be an int in [0, {L}), got {layer!r}")
        return torch.full((M,), layer, dtype=torch.int64, device=self.device)

    def _merge_and_gate(self, g: Tensor, k: Tensor, v: Tensor, s: Tensor, src: Tensor,
                        pending: Tensor) -> tuple[Tensor, int]:
        """The merge stage of a round in torch ops: merges, then the score gate. Returns the buffer
        candidates (ascending positions) and the number of tokens merged."""
        P = self.max_pivots
        gp, sp = g[pending], s[pending]
        used = self._fv("piv_c")[gp] > 0  # [n, P]
        best, best_p = self._nearest_pivot(k, src[pending], gp, used)  # -inf for rows without a pivot
        merge = best >= self.merge_cos
        m_idx = merge.nonzero().squeeze(1)  # one synchronisation for the three selections
        n_merged = self._merge_into_pivots(k, v, s, src, pending[m_idx], (gp * P + best_p)[m_idx], best[m_idx])

        keep = ~merge
        if self.score_gate > 0:
            # Reference gate: keep a non-merging token only if its score beats score_gate x the
            # row's mean score per merged token (after this round's merges). Rows without a pivot
            # never gate.
            row_mean = self._fv("piv_s")[gp].sum(dim=1) / self._fv("piv_c")[gp].sum(dim=1).clamp_min(_EPS)
            gated = keep & used.any(dim=1) & ~(sp > self.score_gate * row_mean)
            keep &= ~gated
        return pending[keep], n_merged

    def _nearest_pivot(self, k: Tensor, k_rows: Tensor, gp: Tensor, used: Tensor) -> tuple[Tensor, Tensor]:
        """Cosine of key ``k[k_rows[i]]`` to the most similar pivot of flat row ``gp[i]`` (pivots as
        of now) and that pivot's slot.

        Computed in chunks of tokens so the gathered pivots ([chunk, P, D] fp32) stay small when a
        whole step's tokens (all layers) arrive at once.
        """
        n = k_rows.numel()
        pk = self._fv("piv_k")
        best = torch.empty(n, device=self.device)
        best_p = torch.empty(n, dtype=torch.int64, device=self.device)
        for a in range(0, n, _TOKEN_CHUNK):
            b = min(a + _TOKEN_CHUNK, n)
            kn = F.normalize(k[k_rows[a:b]].float(), dim=-1, eps=_EPS)
            pn = F.normalize(pk[gp[a:b]].float(), dim=-1, eps=_EPS)  # [c, P, D]
            cos = torch.einsum("md,mpd->mp", kn, pn).clamp_(-1.0, 1.0)
            cos.masked_fill_(~used[a:b], float("-inf"))
            best[a:b], best_p[a:b] = cos.max(dim=1)  # first maximum on ties
        return best, best_p

    def _merge_into_pivots(self, k: Tensor, v: Tensor, s: Tensor, src: Tensor, tok: Tensor, flat: Tensor,
                           cos: Tensor) -> int:
        """Merge tokens ``tok`` (positions) into pivots ``flat`` (flat pivot index) with weights exp(cos)."""
        if tok.numel() == 0:
            return 0
        D = self.head_dim
        a = torch.exp(cos)
        uslot, inv = torch.unique(flat, return_inverse=True)
        nu = uslot.numel()
        rows = src[tok]
        ka = torch.zeros(nu, D, device=self.device).index_add_(0, inv, a[:, None] * k[rows].float())
        va = torch.zeros(nu, D, device=self.device).index_add_(0, inv, a[:, None] * v[rows].float())
        asum = torch.zeros(nu, device=self.device).index_add_(0, inv, a)
        ssum = torch.zeros(nu, device=self.device).index_add_(0, inv, s[tok])
        csum = torch.zeros(nu, device=self.device).index_add_(0, inv, torch.ones_like(a))
        pk, pv = self._fv("piv_k").view(-1, D), self._fv("piv_v").view(-1, D)
        pw, ps, pc = self._fv("piv_w").view(-1), self._fv("piv_s").view(-1), self._fv("piv_c").view(-1)
        w_old = pw[uslot]
        w_new = w_old + asum
        pk[uslot] = ((w_old[:, None] * pk[uslot].float() + ka) / w_new[:, None]).to(self.dtype)
        pv[uslot] = ((w_old[:, None] * pv[uslot].float() + va) / w_new[:, None]).to(self.dtype)
        pw[uslot] = w_new
        ps[uslot] = ps[uslot] + ssum
        pc[uslot] = pc[uslot] + csum
        self._merged_tokens += tok.numel()
        return tok.numel()

    def _fill_buffers(self, g: Tensor, k: Tensor, v: Tensor, s: Tensor, src: Tensor, cand: Tensor) -> None:
        """Per row with candidates: its buffered tokens and its candidates (ascending positions),
        ranked by score (buffered first, then candidates in order, on ties). The first
        ``buffer_size`` are the buffer (slot = rank, so slot 0 holds the best), the next
        ``carry_slots`` are carried over to the next insert, the rest are dropped (counted); a
        full buffer collapses into a pivot."""
        B, C, D = self.buffer_size, self.carry_slots, self.head_dim
        rows = torch.unique(g[cand])
        bn, cn = self._fv("buf_n"), self._fv("car_n")
        slots = torch.arange(B, device=self.device)
        held = slots < bn[rows].to(torch.int64)[:, None]  # [r, B]
        old = (rows[:, None] * B + slots)[held]
        e_row = torch.cat([rows[:, None].expand(-1, B)[held], g[cand]])
        e_s = torch.cat([self._fv("buf_s").view(-1)[old], s[cand]])
        e_k = torch.cat([self._fv("buf_k").view(-1, D)[old], k[src[cand]].to(self.dtype)])
        e_v = torch.cat([self._fv("buf_v").view(-1, D)[old], v[src[cand]].to(self.dtype)])
        order = torch.argsort(-e_s, stable=True)
        order = order[torch.argsort(e_row[order], stable=True)]
        er = e_row[order]
        rank = torch.arange(er.numel(), device=self.device) - torch.searchsorted(er, er)
        total = torch.searchsorted(er, rows, right=True) - torch.searchsorted(er, rows)
        for name in ("buf_k", "buf_v", "buf_s", "car_k", "car_v", "car_s"):
            self._fv(name).index_fill_(0, rows, 0)
        to_buf, to_car = rank < B, (rank >= B) & (rank < B + C)
        at = er[to_buf] * B + rank[to_buf]
        self._fv("buf_k").view(-1, D)[at] = e_k[order[to_buf]]
        self._fv("buf_v").view(-1, D)[at] = e_v[order[to_buf]]
        self._fv("buf_s").view(-1)[at] = e_s[order[to_buf]]
        if C:
            at = er[to_car] * C + rank[to_car] - B
            self._fv("car_k").view(-1, D)[at] = e_k[order[to_car]]
            self._fv("car_v").view(-1, D)[at] = e_v[order[to_car]]
            self._fv("car_s").view(-1)[at] = e_s[order[to_car]]
        bn[rows] = total.clamp_max(B).to(bn.dtype)
        cn[rows] = (total - B).clamp(0, C).to(cn.dtype)
        self._overflow_dropped_tokens += int((total - B - C).clamp_min(0).sum())
        full = rows[total >= B]
        if full.numel():
            self._collapse(full)

    def _collapse(self, rows: Tensor) -> None:
        """Turn the full buffers of ``rows`` (flat layer/head/row indices) into one pivot each."""
        n = rows.numel()
        ar = torch.arange(n, device=self.device)
        bk = self._fv("buf_k")[rows].float()  # [n, B, D]
        bv = self._fv("buf_v")[rows].float()
        bs = self._fv("buf_s")[rows]  # [n, B]

        seed = torch.argmax(bs, dim=1)  # highest score, first on ties
        kn = F.normalize(bk, dim=-1, eps=_EPS)
        cos = torch.einsum("fbd,fd->fb", kn, kn[ar, seed]).clamp_(-1.0, 1.0)
        a = torch.exp(cos)
        w = a.sum(dim=1)
        k_new = (a[..., None] * bk).sum(dim=1) / w[:, None]
        v_new = (a[..., None] * bv).sum(dim=1) / w[:, None]

        used = self._fv("piv_c")[rows] > 0  # [n, P]
        slot = torch.argmax((~used).to(torch.int8), dim=1)  # first free slot
        full = used.all(dim=1)
        victim = self._merge_weakest_pivot(rows, full)
        slot = torch.where(full, victim, slot)

        self._fv("piv_k")[rows, slot] = k_new.to(self.dtype)
        self._fv("piv_v")[rows, slot] = v_new.to(self.dtype)
        self._fv("piv_w")[rows, slot] = w
        self._fv("piv_s")[rows, slot] = bs.sum(dim=1)
        self._fv("piv_c").view(-1).index_fill_(0, rows * self.max_pivots + slot, float(self.buffer_size))
        self._fv("buf_n").index_fill_(0, rows, 0)
        self._pivots_created += n

    def _merge_weakest_pivot(self, rows: Tensor, full: Tensor) -> Tensor:
        """In the rows where ``full``, merge the lowest-W pivot into its most similar sibling.

        Computed for every row and applied with a mask (no host synchronisation); rows that are
        not full are left unchanged. Returns the freed (victim) slot of every row.
        """
        pk, pv = self._fv("piv_k"), self._fv("piv_v")
        pw, ps, pc = self._fv("piv_w"), self._fv("piv_s"), self._fv("piv_c")
        ar = torch.arange(rows.numel(), device=self.device)
        w_rows = pw[rows]  # [n, P]
        victim = torch.argmin(w_rows, dim=1)  # lowest W, first on ties
        kp, vp = pk[rows].float(), pv[rows].float()
        kpn = F.normalize(kp, dim=-1, eps=_EPS)
        sim = torch.einsum("fpd,fd->fp", kpn, kpn[ar, victim]).clamp_(-1.0, 1.0)
        sim.scatter_(1, victim[:, None], float("-inf"))
        nb = torch.argmax(sim, dim=1)  # most similar sibling, first on ties
        # The victim's weight is discounted by exp(cos - 1) <= 1, as in the reference kernel:
        # its tokens were weighted against their own seed, not the sibling's.
        w_v = w_rows[ar, victim] * torch.exp(sim[ar, nb] - 1.0)
        w_n = w_rows[ar, nb]
        w_m = w_v + w_n
        k_m = (w_v[:, None] * kp[ar, victim] + w_n[:, None] * kp[ar, nb]) / w_m[:, None]
        v_m = (w_v[:, None] * vp[ar, victim] + w_n[:, None] * vp[ar, nb]) / w_m[:, None]
        f1, f2 = full[:, None], full
        # Rows that are not full write their sibling's old values back (a no-op).
        pk[rows, nb] = torch.where(f1, k_m, kp[ar, nb]).to(self.dtype)
        pv[rows, nb] = torch.where(f1, v_m, vp[ar, nb]).to(self.dtype)
        pw[rows, nb] = torch.where(f2, w_m, w_n)
        ps[rows, nb] = torch.where(f2, ps[rows, victim] + ps[rows, nb], ps[rows, nb])
        pc[rows, nb] = torch.where(f2, pc[rows, victim] + pc[rows, nb], pc[rows, nb])
        return victim

    # ------------------------------------------------------------------ retrieval
    def retrieve(
        self,
        layer: int,
        query_coords: Tensor,
        max_tokens: int,
        step: int,
        radius: int = 2,
        include_buffer: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Pivots (and optionally buffered tokens) of the voxels near ``query_coords``.

        Args:
            layer: global-attention layer index.
            query_coords: LongTensor [Q, 3], voxels hit by the recent window's tokens.
            max_tokens: per-head budget of returned tokens.
            step: current stream step (marks the candidate voxels as used).
            radius: Chebyshev radius in voxels (2 -> 5x5x5 neighbourhood).
            include_buffer: also return buffered raw tokens after the pivots (bias 0).

        Returns:
            ``k [H, T, D]``, ``v [H, T, D]`` (pool dtype), ``bias [H, T]`` float32
            (``log(C)`` for pivots, 0 for raw tokens, ``-inf`` for padding) and
            ``valid [H, T]`` bool; ``T <= max_tokens``.
        """
        return self.retrieve_layers([layer], query_coords, max_tokens, step, radius, include_buffer)[0]

    def retrieve_layers(
        self,
        layers: Sequence[int],
        query_coords: Tensor,
        max_tokens: int,
        step: int,
        radius: int = 2,
        include_buffer: bool = True,
        *,
        query_valid: Tensor | None = None,
    ) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """``retrieve`` for several layers in one batched pass: one result per entry of ``layers``,
        each exactly what ``retrieve(layer, ...)`` returns (its own ``T``).

        ``query_valid`` (bool [Q], e.g. the mask from ``voxel_coords``) selects the queries to use;
        with it, coordinates outside the supported range are ignored instead of raising, so the
        call needs one host synchronisation in all (the output lengths) and can be queued behind
        the insert still running on the GPU.
        """
        layers = list(layers)
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
                raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        _check_int("max_tokens", max_tokens, 0)
        _check_int("radius", radius, 0)
        if radius > _MAX_RADIUS:
            raise ValueError(f"radius must be <= {_MAX_RADIUS}, got {radius}")
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"step must be an int, got {step!r}")
        if not isinstance(query_coords, Tensor):
            raise ValueError("query_coords must be a LongTensor [Q, 3]")
        if query_valid is None:
            qkeys = self._keys(query_coords, "query_coords")
            qvalid = torch.ones(qkeys.shape, dtype=torch.bool, device=self.device)
        else:
            if not isinstance(query_valid, Tensor) or query_valid.dtype != torch.bool \
                    or tuple(query_valid.shape) != tuple(query_coords.shape[:1]):
                raise ValueError(f"query_valid must be a bool tensor [{query_coords.shape[0]}]")
            qkeys = self._keys(query_coords, "query_coords", check_range=False)
            in_range = (query_coords.to(self.device).abs() <= _COORD_LIMIT).all(dim=1)
            qvalid = query_valid.to(self.device) & in_range
        if not layers:
            return []
        if qkeys.numel() == 0 or max_tokens == 0:
            return [self._empty_result() for _ in layers]
        rows, candidate = self._candidate_rows(qkeys, qvalid, radius)
        last_used = self._tensors["row_last_used"]
        by_row = torch.empty_like(candidate).scatter_(0, rows, candidate)
        last_used.copy_(torch.where(by_row, step, last_used))
        return self._gather_retrieved(layers, rows, candidate, max_tokens, include_buffer)

    def _empty_result(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        H, D = self.num_heads, self.head_dim
        return (
            torch.zeros(H, 0, D, dtype=self.dtype, device=self.device),
            torch.zeros(H, 0, D, dtype=self.dtype, device=self.device),
            torch.zeros(H, 0, dtype=torch.float32, device=self.device),
            torch.zeros(H, 0, dtype=torch.bool, device=self.device),
        )

    def _candidate_rows(self, qkeys: Tensor, qvalid: Tensor, radius: int) -> tuple[Tensor, Tensor]:
        """Every row in ascending voxel-key order (free rows first) and which of them are held
        voxels within Chebyshev ``radius`` of a valid query voxel. Fixed sizes (the capacity),
        so no host synchronisation."""
        r = torch.arange(-radius, radius + 1, device=self.device)
        offs = torch.cartesian_prod(r, r, r)
        # Packing is linear per axis within the coordinate limit, so neighbour keys are sums.
        off_keys = offs[:, 0] + (offs[:, 1] << _BITS) + (offs[:, 2] << (2 * _BITS))
        keys = (qkeys[:, None] + off_keys[None, :]).reshape(-1)
        sorted_keys, rows = torch.sort(self._tensors["row_key"])  # free rows (-1) sort first
        at = torch.searchsorted(sorted_keys, keys).clamp_max(self._cap - 1)
        hit = (sorted_keys[at] == keys) & qvalid[:, None].expand(-1, off_keys.numel()).reshape(-1)
        # Misses write to a spare last slot. index_fill_, not an accumulating index_put_: every
        # write stores True, so duplicates need no atomics (a few hot voxels drew ~1.4 M adds to
        # the same counters, 83 ms on the H200).
        at = torch.where(hit, at, self._cap)
        candidate = torch.zeros(self._cap + 1, dtype=torch.bool, device=self.device).index_fill_(0, at, True)
        return rows, candidate[: self._cap]

    def _layer_index(self, layers: list[int]) -> Tensor:
        """``layers`` as a device tensor, made once per list: a host->device copy from pageable
        memory synchronises the stream, draining the GPU's queue every step."""
        key = tuple(layers)
        cached = self._layer_indices.get(key)
        if cached is None:
            cached = self._layer_indices[key] = torch.tensor(layers, dtype=torch.int64).to(self.device)
        return cached

    def _gather_retrieved(
        self, layers: list[int], rows: Tensor, candidate: Tensor, max_tokens: int, include_buffer: bool
    ) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Rank the candidate rows' pivots (then buffered tokens) per (layer, head) and compact.

        ``rows`` are all rows in voxel-key order, ``candidate`` marks the ones to rank (same
        order). One host synchronisation whatever the number of layers: the widest pivot and
        buffer selections and the per-layer output lengths, read together.
        """
        H, D, P, B = self.num_heads, self.head_dim, self.max_pivots, self.buffer_size
        t, dev = self._tensors, self.device
        nl, R = len(layers), rows.numel()
        ll = self._layer_index(layers)[:, None, None]
        hh = torch.arange(H, device=dev)[None, :, None]
        rr = rows[None, None, :]
        # ---- pivots, ranked by W per (layer, head); ties: voxel key, then slot ----
        c = t["piv_c"][ll, hh, rr].reshape(nl, H, R * P)
        w = t["piv_w"][ll, hh, rr].reshape(nl, H, R * P)
        p_valid = (c > 0) & candidate[:, None].expand(R, P).reshape(1, 1, R * P)
        p_order = torch.argsort(torch.where(p_valid, w, torch.full_like(w, float("-inf"))),
                                dim=-1, descending=True, stable=True)
        n_piv = p_valid.sum(dim=-1).clamp_max(max_tokens)  # [nl, H]
        # ---- buffered raw tokens fill the remaining budget, by score ----
        if include_buffer:
            bn = t["buf_n"][ll, hh, rr]  # [nl, H, R]
            b_valid = (torch.arange(B, device=dev) < bn[..., None]) & candidate[:, None]
            b_valid = b_valid.reshape(nl, H, R * B)
            s = t["buf_s"][ll, hh, rr].reshape(nl, H, R * B)
            b_order = torch.argsort(torch.where(b_valid, s, torch.full_like(s, float("-inf"))),
                                    dim=-1, descending=True, stable=True)
            n_buf = torch.minimum(b_valid.sum(dim=-1), max_tokens - n_piv)
        else:
            n_buf = torch.zeros_like(n_piv)
        total = n_piv + n_buf  # [nl, H]: valid entries per (layer, head), pivots first
        sizes = torch.cat([n_piv.amax().reshape(1), n_buf.amax().reshape(1), total.amax(dim=1)]).tolist()
        tp, tb, lengths = sizes[0], sizes[1], sizes[2:]
        T = max(lengths)
        # Pivot j of a (layer, head) goes to column j, buffered token j to n_piv + j; every
        # unused column keeps the padding (zero K/V, bias -inf, invalid). Unused selections are
        # sent to a spare last column, dropped at the end.
        k_out = torch.zeros(nl, H, T + 1, D, dtype=self.dtype, device=dev)
        v_out = torch.zeros(nl, H, T + 1, D, dtype=self.dtype, device=dev)
        bias = torch.full((nl, H, T + 1), float("-inf"), dtype=torch.float32, device=dev)
        valid = torch.zeros(nl, H, T + 1, dtype=torch.bool, device=dev)

        def place(column: Tensor, ok: Tensor, k: Tensor, v: Tensor, b: Tensor) -> None:
            column = torch.where(ok, column, T)
            k_out.scatter_(2, column[..., None].expand(-1, -1, -1, D), k)
            v_out.scatter_(2, column[..., None].expand(-1, -1, -1, D), v)
            bias.scatter_(2, column, torch.where(ok, b, float("-inf")))
            valid.scatter_(2, column, ok)

        if tp > 0:
            p_sel = p_order[..., :tp]
            p_row, p_slot = rows[p_sel // P], p_sel % P
            j = torch.arange(tp, device=dev)
            place(j.expand(nl, H, tp), j < n_piv[..., None], t["piv_k"][ll, hh, p_row, p_slot],
                  t["piv_v"][ll, hh, p_row, p_slot], torch.log(c.gather(-1, p_sel).clamp_min(1.0)))
        if include_buffer and tb > 0:
            b_sel = b_order[..., :tb]
            b_row, b_slot = rows[b_sel // B], b_sel % B
            j = torch.arange(tb, device=dev)
            place(n_piv[..., None] + j, j < n_buf[..., None], t["buf_k"][ll, hh, b_row, b_slot],
                  t["buf_v"][ll, hh, b_row, b_slot], torch.zeros(nl, H, tb, device=dev))
        # Each layer gets tensors of its own (cloned): memory accounting sees exactly its T.
        return [tuple(x[i, :, : lengths[i]].clone() for x in (k_out, v_out, bias, valid)) for i in range(nl)]

    # ------------------------------------------------------------------ state export / import
    #: the host-side counters, in the order of the ``counters`` tensor of ``export_state``
    _COUNTER_NAMES = (
        "_evicted_voxels", "_evicted_pivots", "_inserted_tokens", "_merged_tokens", "_gated_tokens",
        "_capacity_dropped_tokens", "_overflow_dropped_tokens", "_pivots_created", "_insert_calls",
    )

    @classmethod
    def state_specs(
        cls,
        voxels: int,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        buffer_size: int = 8,
        max_pivots: int = 4,
        carry_slots: int = 8,
    ) -> dict[str, "PoolTensorSpec"]:
        """Name -> shape, dtype and fill of every tensor a pool of ``voxels`` rows holds (the data of
        ``export_state``; a fresh row holds the fill). Their bytes add up to ``bytes_for(voxels, ...)``."""
        specs = _field_specs(num_layers, num_heads, head_dim, dtype, buffer_size, max_pivots, carry_slots)
        return {name: PoolTensorSpec(f.lead + (voxels,) + f.tail, f.dtype, f.fill, len(f.lead))
                for name, f in specs.items()}

    def export_state(self) -> dict[str, Tensor]:
        """The pool as plain tensors (copies): every ``state_specs`` tensor at the current capacity,
        plus its statistics, ``counters`` (int64, host) and ``device_counters`` (int64, the pool's
        device, one per ``INSERT_COUNTERS``). The settings (voxel size, caps, ...) are not state:
        a pool imports only into one built with the same ones."""
        state = {name: t.clone() for name, t in self._tensors.items()}
        state["counters"] = torch.tensor([int(getattr(self, n)) for n in self._COUNTER_NAMES], dtype=torch.int64)
        device_counters = self._kernel_counts
        if device_counters is None:
            device_counters = torch.zeros(len(INSERT_COUNTERS), dtype=torch.int64, device=self.device)
        state["device_counters"] = device_counters.clone()
        return state

    def import_state(self, state: dict[str, Tensor]) -> None:
        """Replace the pool's content by ``state`` (from ``export_state``, or just its
        ``state_specs`` tensors: the statistics then start at zero). Tensors are copied to the
        pool's device; shapes and dtypes are checked against this pool's settings."""
        optional = ("counters", "device_counters")
        missing = [name for name in self._specs if name not in state]
        unknown = sorted(set(state) - set(self._specs) - set(optional))
        if missing or unknown:
            raise ValueError(f"voxel pool state: missing {missing}, unknown {unknown}")
        voxels = int(state["row_key"].shape[0])
        if not 1 <= voxels <= self.max_voxels:
            raise ValueError(f"voxel pool state holds {voxels} rows; this pool allows 1 to {self.max_voxels}")
        specs = self.state_specs(voxels, self.num_layers, self.num_heads, self.head_dim, self.dtype,
                                 self.buffer_size, self.max_pivots, self.carry_slots)
        for name, spec in specs.items():
            t = state[name]
            if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
                raise ValueError(f"voxel pool state: {name} is {t.dtype} {tuple(t.shape)}, "
                                 f"this pool needs {spec.dtype} {spec.shape}")
        self._tensors = {name: state[name].to(self.device).clone().contiguous() for name in specs}
        self._cap = voxels
        counters = state.get("counters")
        values = counters.tolist() if counters is not None else [0] * len(self._COUNTER_NAMES)
        if len(values) != len(self._COUNTER_NAMES):
            raise ValueError(f"voxel pool state: counters has {len(values)} entries, expected {len(self._COUNTER_NAMES)}")
        for name, value in zip(self._COUNTER_NAMES, values):
            setattr(self, name, int(value))
        device_counters = state.get("device_counters")
        if device_counters is not None and tuple(device_counters.shape) != (len(INSERT_COUNTERS),):
            raise ValueError(f"voxel pool state: device_counters has shape {tuple(device_counters.shape)}, "
                             f"expected ({len(INSERT_COUNTERS)},) (one per {', '.join(INSERT_COUNTERS)})")
        self._kernel_counts = None if device_counters is None else device_counters.to(self.device).clone()


@dataclass(frozen=True)
class PoolTensorSpec:
    """One tensor of a pool's state: its shape, dtype, the value of a free row and which axis is
    the voxel (row) axis."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: float
    voxel_axis: int
