"""Which synthetic scene seeds are for what. Training pools draw from seed x 100,000 on and must
never render a scene the benchmarks score (held out) or one that picks a checkpoint (validation):
choosing between checkpoints on the held-out scenes would tune on them."""

from __future__ import annotations

SPLIT_COUNT = 10_000
HELD_OUT_SEED = 1_000_000  # quality benchmarks score these
VALIDATION_SEED = 2_000_000  # checkpoints are compared on these
SPLITS = {"held-out": HELD_OUT_SEED, "validation": VALIDATION_SEED}


def split_overlapping(first_seed: int, count: int) -> str | None:
    """The split that seeds ``first_seed`` .. ``first_seed + count - 1`` reach (None: none)."""
    for name, first in SPLITS.items():
        if first_seed < first + SPLIT_COUNT and first_seed + count > first:
            return name
    return None
