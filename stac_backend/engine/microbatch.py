"""Micro-batched steps and step-memory measurement for the torch engine.

A batched step over N streams holds the activations of all N at once (about 0.6 GiB per stream for
vggt-1b at 518x392 in bf16), so its peak grows with N until a large batch no longer fits beside the
streams' caches. Splitting the step into micro-batches of at most ``m`` streams, run one after the
other, bounds the activation memory by what ``m`` streams need whatever N is; every stream still
takes exactly one step on its own chunk, and each micro-batch is an ordinary batched step
(``push_many``), so the outputs are those of one unsplit step.

Streams are grouped by chunk shape first (a batched forward needs one shape), then each group is
cut into ``ceil(n / m)`` micro-batches of near-equal size (20 streams at m = 8: 7, 7, 6), which
keeps the number of distinct batch shapes small.

Failure rule (the runtime interface's contract): a step that raises ``ValueError`` left every
stream untouched, any other exception leaves ``broken`` set on the streams it may have changed.
When a micro-batch fails after earlier ones of the same step succeeded, those earlier streams have
advanced but their outputs never reach the caller, so a retry would step them twice: they are
marked broken too, and a ``ValueError`` (which would claim that nothing changed) is re-raised as
a ``RuntimeError``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Optional, Sequence, TypeVar

import torch
from torch import Tensor

from .stream import Stream, push_many

T = TypeVar("T")


def split_evenly(items: Sequence[T], max_size: Optional[int]) -> list[list[T]]:
    """``items`` in order, cut into ``ceil(len / max_size)`` runs whose sizes differ by at most one
    (one run when ``max_size`` is None)."""
    items = list(items)
    if not items:
        return []
    if max_size is None or len(items) <= max_size:
        return [items]
    if max_size < 1:
        raise ValueError(f"max_size must be a positive integer or None, got {max_size!r}")
    parts = math.ceil(len(items) / max_size)
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for p in range(parts):
        size = base + (1 if p < extra else 0)
        out.append(items[start:start + size])
        start += size
    return out


def plan_micro_batches(
    shapes: Sequence[tuple[int, ...]], max_streams: Callable[[tuple[int, int]], Optional[int]]
) -> list[list[int]]:
    """Stream indices of each micro-batch. ``shapes``: each stream's chunk shape (C, 3, H, W);
    ``max_streams(image_hw)``: the largest micro-batch at that frame size (None: no split)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, shape in enumerate(shapes):
        groups[tuple(shape)].append(i)
    plan: list[list[int]] = []
    for shape, members in groups.items():
        plan.extend(split_evenly(members, max_streams(tuple(shape[-2:]))))
    return plan


def run_micro_batches(
    streams: Sequence[Stream], images: Sequence[Tensor], max_streams: Callable[[tuple[int, int]], Optional[int]]
) -> list[dict[str, Tensor]]:
    """One step of every stream, run as micro-batches of at most ``max_streams(image_hw)`` streams.

    Returns per stream its outputs, in the order of ``streams``. A single micro-batch is exactly
    ``push_many(streams, images)``. Failures follow the rule in the module docstring.
    """
    streams, images = list(streams), list(images)
    if len(streams) != len(images):
        raise ValueError("one chunk per stream")
    plan = plan_micro_batches([tuple(x.shape) for x in images], max_streams)
    if len(plan) <= 1:
        return push_many(streams, images)
    results: list[Optional[dict[str, Tensor]]] = [None] * len(streams)
    done: list[int] = []
    for members in plan:
        try:
            outs = push_many([streams[i] for i in members], [images[i] for i in members])
        except Exception as exc:
            if not done:
                raise  # nothing of this step has run yet: the first micro-batch's own rule applies
            reason = f"a later micro-batch of the same step failed ({type(exc).__name__}: {exc})"
            for i in done:
                streams[i].broken = reason
            if not isinstance(exc, ValueError):
                raise  # its own streams are marked broken already (e.g. out of memory: still that type)
            # A refusal before any work of this micro-batch, but the step as a whole changed streams.
            raise RuntimeError(f"step failed after {len(done)} of {len(streams)} streams had stepped: {exc}") from exc
        for i, out in zip(members, outs):
            results[i] = out
        done.extend(members)
    return results  # type: ignore[return-value]


# ------------------------------------------------------------------ measuring a step's memory


def measure_peak_bytes(run: Callable[[], T], device: torch.device) -> tuple[T, Optional[int]]:
    """``run()`` and the most bytes its allocations added on ``device`` above what was allocated
    when it started (its activations and transient copies; outputs it returns count too).

    CUDA: the caching allocator's peak statistics (exact for allocated bytes; the allocator's peak
    statistic is reset). CPU: the allocation events of the torch profiler, summed in time order
    (a measurement of torch's own allocations; None where this torch's profiler has no such
    events). Other devices: None.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = run()
        torch.cuda.synchronize(device)
        return result, max(0, torch.cuda.max_memory_allocated(device) - before)
    if device.type == "cpu":
        return _cpu_peak_bytes(run)
    return run(), None


def _cpu_peak_bytes(run: Callable[[], T]) -> tuple[T, Optional[int]]:
    from torch.autograd.profiler import profile  # torch.profiler's wrapper adds seconds of post-processing

    with profile(profile_memory=True) as prof:
        result = run()
    try:
        events = []
        pending = list(prof.kineto_results.experimental_event_tree())
        while pending:
            node = pending.pop()
            pending.extend(node.children)
            if type(node.extra_fields).__name__.endswith("Allocation") and str(node.extra_fields.device) == "cpu":
                events.append((node.start_time_ns, int(node.extra_fields.alloc_size)))
    except (AttributeError, RuntimeError):  # the profiler's event tree is not a stable API
        return result, None
    total = peak = 0
    for _, size in sorted(events):
        total += size
        peak = max(peak, total)
    return result, peak
