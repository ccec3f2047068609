"""The torch engine behind the runtime interface: eager (or compiled) torch modules on one device.

Memory-bounded steps: a step of many streams runs as micro-batches of at most
``max_batch_streams`` streams (``engine/microbatch.py``), so its activation memory does not grow
with the number of streams; the outputs are those of one unsplit step.

    runtime = TorchRuntime(model, CacheConfig(policy="stac"), max_batch_streams="auto")
    runtime.warmup((392, 518), batch_sizes=(1, 8))   # at server start: no request pays a first use
    runtime.step_memory_bytes((392, 518))           # measured peak of one micro-batch step

``max_batch_streams``: an int, None (never split: one batched step for all streams), or "auto":
on CUDA the size is chosen per frame size from the free memory and the measured peak of a
one-stream step (at most ``auto_max_batch_streams``); on other devices "auto" does not split.

``warmup`` runs throwaway streams of the runtime's own cache configuration, made to fill their
voxel pool (every evicted token positioned, retrieval from the first step, every step, plus one
stream of coarse voxels whose tokens merge), for enough steps that every part of a step has run -
eviction, the pool's insert with its merges, retrieval and the attention over retrieved tokens -
and measures the peak a step adds: on CUDA every step's, from the caching allocator's
statistics; on the CPU the last step's, from the torch profiler's allocation events. It then frees everything it made. Without a
warm-up, a CUDA runtime that splits measures a frame size the first time it needs it (a step or
``step_memory_bytes`` at that size).

``compile=True`` (or a model built with ``compile=True`` / ``STAC_COMPILE=1``) runs the cache-free
parts of a step compiled (``model/compiled.py``): one graph set per (streams per micro-batch, frames
per step) bucket. ``warmup`` then compiles every bucket a step can use at that frame size - each
micro-batch size from 1 to the largest, and the ``batch_sizes`` asked for - reports the seconds each
took (``compile_seconds``), and freezes the model, so that no request pays a compile (a shape never
warmed up runs eagerly).
"""

from __future__ import annotations

import gc
import logging
import math
import time
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..cache import CacheConfig
from ..model.compiled import CompiledParts, compile_static_parts
from ..model.vggt import VGGT
from .microbatch import measure_peak_bytes, run_micro_batches
from .runtime import Runtime
from .stream import Stream, push_many

log = logging.getLogger(__name__)

AUTO = "auto"
ImageHW = tuple[int, int]


def warmup_steps(config: CacheConfig) -> int:
    """Steps after which a stream of ``config`` has evicted, filed evictions into its pool,
    retrieved from it and attended the retrieved tokens: the hot cache's frames plus one chunk
    to start evicting, then one step to retrieve and one to attend."""
    hot_frames = len(config.pinned_frames) + config.window + config.hh
    return math.ceil((hot_frames + config.chunk) / config.chunk) + 2


class TorchRuntime(Runtime):
    """Streams of ``model`` with caches made from ``cache_config``; steps split into micro-batches
    of at most ``max_batch_streams`` streams (see the module docstring)."""

    name = "torch"
    #: "auto" (CUDA): the largest micro-batch. vggt-1b's aggregate frames/s is flat from 8 streams
    #: per batched step up (H100 and H200): larger steps only cost activation memory.
    auto_max_batch_streams = 8
    #: "auto" (CUDA): the share of the free GPU memory one micro-batch's activations may take.
    auto_activation_share = 0.15

    def __init__(self, model: VGGT, cache_config: CacheConfig, max_batch_streams: Union[int, str, None] = AUTO,
                 compile: Optional[bool] = None):
        if not (max_batch_streams is None or max_batch_streams == AUTO
                or (isinstance(max_batch_streams, int) and not isinstance(max_batch_streams, bool) and max_batch_streams >= 1)):
            raise ValueError(f"max_batch_streams must be a positive integer, None or 'auto', got {max_batch_streams!r}")
        self.model = model
        self.cache_config = cache_config
        self.max_batch_streams = max_batch_streams
        self.device = next(model.parameters()).device
        # compile: True compiles the model's cache-free parts; None keeps the model as built.
        if compile:
            compile_static_parts(model)
        # Buckets (frame size, streams per step) compiled by a warm-up.
        self._compiled_buckets: set[tuple[ImageHW, int]] = set()
        # Measured peak bytes a step adds, by frame size and then by streams per step.
        self._step_peaks: dict[ImageHW, dict[int, int]] = {}
        self._auto_sizes: dict[ImageHW, int] = {}
        # Measured bytes of one stream's step outputs on the device, by frame size.
        self._output_bytes: dict[ImageHW, int] = {}

    def open_stream(self) -> Stream:
        return Stream(self.model, cache=self.cache_config)

    def step(self, streams: Sequence[Stream], images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        if self.max_batch_streams is None:
            return push_many(list(streams), list(images))
        return run_micro_batches(streams, images, self.micro_batch_streams)

    # ------------------------------------------------------------------ micro-batch size and memory
    def _splits(self) -> bool:
        return self.max_batch_streams is not None and (self.max_batch_streams != AUTO or self.device.type == "cuda")

    def micro_batch_streams(self, image_hw: ImageHW) -> Optional[int]:
        """Most streams one step runs at once at frames of ``image_hw`` (None: all of them)."""
        if not self._splits():
            return None
        if isinstance(self.max_batch_streams, int):
            return self.max_batch_streams
        hw = _hw(image_hw)
        if hw not in self._auto_sizes:
            self.warmup(hw)
        return self._auto_sizes[hw]

    def step_memory_bytes(self, image_hw: ImageHW) -> Optional[int]:
        """Measured peak bytes one micro-batch step adds at frames of ``image_hw`` (activations,
        transient cache copies and the micro-batch's outputs). None without a split (the peak
        grows with the number of streams) or, on the CPU, before a warm-up at that size; a CUDA
        runtime that splits measures the size now if no warm-up did."""
        if not self._splits():
            return None
        hw = _hw(image_hw)
        if hw not in self._step_peaks and self.device.type == "cuda":
            self.warmup(hw)
        return self.activation_bytes(hw, self.micro_batch_streams(hw))

    def step_output_bytes(self, image_hw: ImageHW) -> Optional[int]:
        """Bytes of one stream's outputs of a step at frames of ``image_hw``, on this runtime's
        device (measured by the warm-up; None before it). A split step keeps the outputs of its
        earlier micro-batches while the later ones run, so admission charges them per stream on
        top of the one micro-batch step that ``step_memory_bytes`` measures."""
        if not self._splits():
            return None
        return self._output_bytes.get(_hw(image_hw))

    def _device_bytes(self, outputs: dict) -> int:
        return sum(t.nbytes for t in outputs.values() if isinstance(t, Tensor) and t.device == self.device)

    def activation_bytes(self, image_hw: ImageHW, streams: int) -> Optional[int]:
        """Peak bytes a step of ``streams`` streams at once adds at frames of ``image_hw``: the
        measured value when a warm-up ran that many, else interpolated (or extrapolated linearly
        beyond the largest) from the measured batch sizes; None before any measurement."""
        peaks = self._step_peaks.get(_hw(image_hw))
        if not peaks:
            return None
        if streams in peaks:
            return peaks[streams]
        sizes = sorted(peaks)
        above = [b for b in sizes if b > streams]
        below = [b for b in sizes if b < streams]
        if above and below:
            lo, hi = below[-1], above[0]
        elif above:  # fewer streams than any measurement: that measurement bounds it
            return peaks[above[0]]
        elif len(sizes) == 1:  # one measurement: proportional (its fixed part makes this an overestimate)
            return math.ceil(peaks[sizes[0]] * streams / sizes[0])
        else:
            lo, hi = sizes[-2], sizes[-1]
        slope = max(0.0, (peaks[hi] - peaks[lo]) / (hi - lo))
        return math.ceil(peaks[lo] + slope * (streams - lo))

    def _auto_size(self, one_stream_peak: Optional[int]) -> int:
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        fits = int(self.auto_activation_share * free // max(1, one_stream_peak or 1))
        return max(1, min(self.auto_max_batch_streams, fits))

    # ------------------------------------------------------------------ warm-up
    def warmup_cache_config(self) -> CacheConfig:
        """The runtime's cache configuration with its voxel pool made to fill (stac): every evicted
        token positioned (confidence bar 0) and retrieval from the first step on, every step."""
        c = self.cache_config
        if c.policy != "stac":
            return c
        return c.replace(conf_threshold=0.0, retrieval_start_frame=0, retrieval_every=1)

    def warmup(self, image_hw: ImageHW, batch_sizes: Optional[Sequence[int]] = None) -> dict:
        """Step throwaway streams at frames of ``image_hw`` so that every kernel of a step has run
        once, at one stream and at each of ``batch_sizes`` streams per step (clipped to the
        micro-batch size; default: 1 and the micro-batch size), and measure the peak each step
        adds (``step_memory_bytes``). Leaves no stream and no memory of its own behind.
        Returns what it ran and measured."""
        hw = _hw(image_hw)
        parts = self.compiled_parts
        if parts is None:
            return self._warmup(hw, batch_sizes, {})
        compile_seconds: dict[int, float] = {}
        parts.frozen = False
        try:
            report = self._warmup(hw, batch_sizes, compile_seconds)
        finally:
            parts.frozen = True
        log.info("compiled buckets at %dx%d (streams per step: seconds): %s", *hw, compile_seconds)
        return report

    @property
    def compiled_parts(self) -> Optional[CompiledParts]:
        return getattr(self.model, "compiled_parts", None)

    def _warmup(self, hw: ImageHW, batch_sizes: Optional[Sequence[int]], compile_seconds: dict[int, float]) -> dict:
        started = time.perf_counter()
        fill = self.warmup_cache_config()
        steps = warmup_steps(fill)
        self._compile_buckets(hw, fill, [1], compile_seconds, measured={1}, steps=steps)
        peaks: dict[int, Optional[int]] = {1: self._throwaway_run(hw, [fill], steps)}
        if fill.policy == "stac":  # coarse voxels: tokens share voxels, buffers fill, collapse and merge
            merge = self._throwaway_run(hw, [fill.replace(voxel_size=1.0e6, merge_cos=0.0)], steps)
            peaks[1] = _max(peaks[1], merge)
        size: Optional[int] = self.max_batch_streams if isinstance(self.max_batch_streams, int) else None
        if self.max_batch_streams == AUTO and self.device.type == "cuda":
            size = self._auto_sizes[hw] = self._auto_size(peaks[1])
        wanted = {1} | {int(b) for b in (batch_sizes or ())} | ({size} if size else set())
        # Compiled: every micro-batch size a step can split into (the last micro-batch is smaller).
        measured = {min(b, size) if size else b for b in wanted if b >= 1}
        self._compile_buckets(hw, fill, sorted((set(range(1, size + 1)) if size else set()) | measured), compile_seconds,
                              measured=measured, steps=steps)
        for b in sorted(measured - {1}):
            peaks[b] = self._throwaway_run(hw, [fill] * b, steps)
        self._step_peaks.setdefault(hw, {}).update({b: p for b, p in peaks.items() if p is not None})
        _release_memory(self.device)
        report = {"image_hw": list(hw), "streams_per_step": sorted(peaks), "steps": steps, "micro_batch_streams": size,
                  "step_peak_bytes": {str(b): p for b, p in sorted(peaks.items())},
                  "seconds": round(time.perf_counter() - started, 3)}
        if self.compiled_parts is not None:
            report["compile_seconds"] = {str(b): round(s, 3) for b, s in sorted(compile_seconds.items())}
            report["compiled_buckets"] = sorted(b for h, b in self._compiled_buckets if h == hw)
        return report

    def _compile_buckets(self, hw: ImageHW, fill: CacheConfig, sizes: Sequence[int], seconds: dict[int, float],
                         measured: set[int], steps: int) -> None:
        """Throwaway streams for each bucket ``b`` in ``sizes`` not compiled yet at ``hw``: one step
        (timed: its compile) and, for buckets the measurement runs will not step, ``steps`` steps
        more, so that every state a step of the bucket can meet (first step, eviction, retrieval -
        inputs of other memory layouts) has been compiled too."""
        if self.compiled_parts is None:
            return
        for b in sizes:
            if (hw, b) in self._compiled_buckets:
                continue
            started = time.perf_counter()
            self._throwaway_run(hw, [fill] * b, 1, measure=False)
            seconds[b] = time.perf_counter() - started
            if b not in measured:
                self._throwaway_run(hw, [fill] * b, steps, measure=False)
            self._compiled_buckets.add((hw, b))

    def _throwaway_run(self, hw: ImageHW, configs: list[CacheConfig], steps: int, measure: bool = True) -> Optional[int]:
        """``steps`` steps of one throwaway stream per config, all in each step; their largest
        measured step peak. The streams are freed before it returns."""
        streams = [Stream(self.model, cache=c) for c in configs]
        chunk = streams[0].chunk_size
        generator = torch.Generator().manual_seed(len(streams))  # leaves the global RNG alone
        frames = torch.randint(0, 256, (len(streams) + steps, chunk, 3, *hw), dtype=torch.uint8, generator=generator)
        peak: Optional[int] = None
        try:
            for t in range(steps):
                images = [s.validate(frames[i + t]) for i, s in enumerate(streams)]
                # Every step on CUDA (a pool growing in any step counts); the CPU's profiler costs
                # several steps' time, so there only the last (full caches, retrieval) is measured.
                if measure and (self.device.type == "cuda" or t == steps - 1):
                    held = sum(s.memory_bytes() for s in streams)
                    outs, added = measure_peak_bytes(lambda images=images: push_many(streams, images), self.device)
                    if added is not None:  # what the caches grew by is theirs (in their bound), not the step's
                        peak = _max(peak, max(0, added - (sum(s.memory_bytes() for s in streams) - held)))
                    self._output_bytes[hw] = max(self._output_bytes.get(hw, 0), max(map(self._device_bytes, outs)))
                else:
                    push_many(streams, images)
        finally:
            for s in streams:
                s.reset()
        return peak


def _hw(image_hw) -> ImageHW:
    h, w = (int(x) for x in image_hw)
    return h, w


def _max(a: Optional[int], b: Optional[int]) -> Optional[int]:
    return b if a is None else a if b is None else max(a, b)


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
