"""The torch engine behind the runtime interface: eager (or compiled) torch modules on one device."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from ..cache import CacheConfig
from ..model.vggt import VGGT
from .runtime import Runtime
from .stream import Stream, push_many


class TorchRuntime(Runtime):
    """Streams of ``model`` with caches made from ``cache_config``."""

    name = "torch"

    def __init__(self, model: VGGT, cache_config: CacheConfig):
        self.model = model
        self.cache_config = cache_config

    def open_stream(self) -> Stream:
        return Stream(self.model, cache=self.cache_config)

    def step(self, streams: Sequence[Stream], images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        return push_many(list(streams), list(images))
