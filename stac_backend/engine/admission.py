"""The memory arithmetic of admission: how many streams a device holds.

A device holds the model, the streams' caches and one step at a time. What a stream is charged
depends on whether the step's memory is known:

* the runtime splits steps into micro-batches and measured a micro-batch step
  (``Runtime.step_memory_bytes``): each stream is charged its resting bound (what its caches hold
  between steps) plus its step outputs (``Runtime.step_output_bytes``: the outputs of finished
  micro-batches stay on the device until the whole step returns), and the step once. The measured step already holds everything a micro-batch of
  streams adds while it runs - activations, transient copies and each stepped stream's new tokens
  before the step prunes them - so charging every stream its in-step bound would count that share
  once per live stream instead of once per stepped stream;
* otherwise (no split: one step may run every stream at once) each stream is charged its full
  in-step bound and the step's own memory is not known.

``streams_that_fit`` is the same rule solved for the number of streams, used for capacity
planning (docs/performance.md) and by a unit test that checks the vggt-1b figures.
"""

from __future__ import annotations

from typing import Optional, Sequence


def charged_bound(bound: Optional[int], resting_bound: Optional[int], step_bytes: Optional[int],
                  output_bytes: Optional[int] = None) -> Optional[int]:
    """What admission charges one stream: its resting bound plus its step outputs (``output_bytes``:
    a split step holds the outputs of its finished micro-batches while later ones run) where the
    step's memory is measured (``step_bytes`` not None), else its full bound; None where unbounded."""
    if step_bytes is not None and resting_bound is not None:
        return resting_bound + (output_bytes or 0)
    return bound


def admission_reserve_bytes(charged: Sequence[int], step_bytes: Optional[int]) -> int:
    """Bytes reserved for streams charged ``charged`` bytes each and one step of ``step_bytes``."""
    return sum(charged) + (step_bytes or 0)


def streams_that_fit(capacity_bytes: int, stream_bytes: int, step_bytes: int = 0, fixed_bytes: int = 0) -> int:
    """Most streams of ``stream_bytes`` each (their charged bound) that fit ``capacity_bytes`` beside
    ``fixed_bytes`` (e.g. the model's weights) and one step of ``step_bytes``."""
    if stream_bytes <= 0:
        raise ValueError(f"stream_bytes must be positive, got {stream_bytes}")
    left = capacity_bytes - fixed_bytes - step_bytes
    return max(0, left // stream_bytes)
