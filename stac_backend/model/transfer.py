"""Host-to-GPU copies that do not make the host wait for the GPU."""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor


def to_device_nonblocking(tensor: Tensor, device: Union[str, torch.device]) -> Tensor:
    """``tensor`` on ``device``, queued behind the work already on the GPU instead of after it.

    A plain copy from pageable host memory makes torch synchronise the stream after it: the host
    waits until every kernel queued so far has run, so it cannot queue the rest of a step (or, in
    the server, read and queue the next batch) while the GPU works. A host tensor bound for a CUDA
    device goes through a pinned copy and a non-blocking transfer instead; torch's pinned-memory
    cache holds that buffer until the transfer is done, so the caller may drop ``tensor`` at once.
    """
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu" or compiling_or_exporting():
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def compiling_or_exporting() -> bool:
    """Whether torch.compile or torch.export is tracing: no pinned copies, no cached tensors then."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler and (compiler.is_compiling() or getattr(compiler, "is_exporting", lambda: False)()))
