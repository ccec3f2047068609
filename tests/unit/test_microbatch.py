"""Memory-bounded steps: a step split into micro-batches gives what one unsplit step gives (outputs
and every stream's cache state), a failure part-way leaves no stream silently stepped, and
admission reserves what one step adds beside the streams' memory bounds."""

from __future__ import annotations

from typing import Optional

import pytest
import torch

from stac_backend.cache import CacheConfig
from stac_backend.engine.microbatch import plan_micro_batches, run_micro_batches, split_evenly
from stac_backend.engine.runtime import Runtime, RuntimeStream
from stac_backend.engine.torch_runtime import TorchRuntime
from stac_backend.serving.sessions import FrameRequest, RequestError, ServingLimits, StepResult, StreamSessions

# The pool takes every evicted token and retrieval starts early, so the split is compared on the
# whole stac step: eviction, the pool's insert and merges, retrieval and attention over retrieved tokens.
STAC = CacheConfig(policy="stac", conf_threshold=0.0, retrieval_start_frame=4, retrieval_every=1)


def test_split_evenly_bounds_sizes_and_keeps_order():
    assert split_evenly(list(range(20)), 8) == [list(range(0, 7)), list(range(7, 14)), list(range(14, 20))]
    assert split_evenly([1, 2, 3], None) == [[1, 2, 3]]
    assert split_evenly([1, 2, 3], 3) == [[1, 2, 3]]
    assert split_evenly([], 2) == []
    for n in range(1, 30):
        for m in range(1, 9):
            parts = split_evenly(list(range(n)), m)
            assert [x for p in parts for x in p] == list(range(n))
            assert max(len(p) for p in parts) <= m and max(map(len, parts)) - min(map(len, parts)) <= 1


def test_plan_groups_by_chunk_shape_then_splits():
    shapes = [(4, 3, 56, 84), (4, 3, 28, 42), (4, 3, 56, 84), (4, 3, 56, 84), (2, 3, 56, 84)]
    sizes = {(56, 84): 2, (28, 42): 2}
    assert plan_micro_batches(shapes, lambda hw: sizes[hw]) == [[0, 2], [3], [1], [4]]
    assert plan_micro_batches(shapes, lambda hw: None) == [[0, 2, 3], [1], [4]]


def test_runtime_option_is_validated(tiny_model):
    for bad in (0, -1, 2.5, "8", True):
        with pytest.raises(ValueError, match="max_batch_streams"):
            TorchRuntime(tiny_model, STAC, max_batch_streams=bad)
    # On the CPU "auto" does not split (and needs no calibration).
    assert TorchRuntime(tiny_model, STAC).micro_batch_streams((56, 84)) is None


def _state_tensors(obj, path="", seen=None):
    """Every tensor reachable from a stream's caches, by attribute path (policy-agnostic)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        yield path, obj
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from _state_tensors(obj[key], f"{path}[{key}]", seen)
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _state_tensors(item, f"{path}[{i}]", seen)
    elif type(obj).__module__.startswith("stac_backend") and hasattr(obj, "__dict__"):
        for key, value in sorted(vars(obj).items()):
            yield from _state_tensors(value, f"{path}.{key}", seen)


def _assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, what
    if a.is_floating_point():
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True, msg=lambda m: what + "\n" + m)
    else:
        assert torch.equal(a, b), what


def test_split_step_equals_unsplit_step(tiny_model):
    """Five streams at two frame sizes, five steps, in fp32: unsplit against micro-batches of 2.
    Not bit-exact: streams attend key sets of different lengths (retrieved tokens), padded to the
    longest of the (micro-)batch, which changes the order of some float sums (~4e-7 here)."""
    generator = torch.Generator().manual_seed(3)
    sizes = [(42, 56)] * 4 + [(28, 42)]
    frames = [torch.rand(20, 3, h, w, generator=generator) for h, w in sizes]
    unsplit, split = TorchRuntime(tiny_model, STAC, max_batch_streams=None), TorchRuntime(tiny_model, STAC, max_batch_streams=2)
    a = [unsplit.open_stream() for _ in sizes]
    b = [split.open_stream() for _ in sizes]
    for step in range(5):
        chunks = [f[4 * step:4 * step + 4] for f in frames]
        outs_a = unsplit.step(a, [s.validate(c) for s, c in zip(a, chunks)])
        outs_b = split.step(b, [s.validate(c) for s, c in zip(b, chunks)])
        for i, (oa, ob) in enumerate(zip(outs_a, outs_b)):
            assert sorted(oa) == sorted(ob)
            for name in oa:
                _assert_close(oa[name], ob[name], f"step {step} stream {i} output {name}")
    assert any(s.cache.pool is not None and s.cache.pool.stats()["inserted_tokens"] > 0 for s in a)
    assert any(s.cache.retrieved for s in a)  # the comparison covers retrieval
    for i, (sa, sb) in enumerate(zip(a, b)):
        assert sa.frames_seen == sb.frames_seen == 20 and sa.memory_bytes() == sb.memory_bytes()
        assert sa.evicted_tokens() == sb.evicted_tokens()
        state_a = dict(_state_tensors((sa.cache, sa.camera_cache)))
        state_b = dict(_state_tensors((sb.cache, sb.camera_cache)))
        assert sorted(state_a) == sorted(state_b) and state_a
        for path in state_a:
            _assert_close(state_a[path], state_b[path], f"stream {i} cache {path}")
        assert sa.cache.stats() == sb.cache.stats()


def test_failure_in_a_later_micro_batch_breaks_the_streams_that_stepped(tiny_model):
    """The streams of an earlier micro-batch advanced but their outputs are lost: a retry would step
    them twice, so they are marked broken and the step fails as a whole."""
    runtime = TorchRuntime(tiny_model, STAC, max_batch_streams=2)
    streams = [runtime.open_stream() for _ in range(4)]
    frames = torch.rand(4, 3, 56, 84)
    images = [s.validate(frames) for s in streams]
    calls = []

    def max_streams(hw):
        return 2

    original = streams[2].cache.begin_step

    def refuse(info):
        calls.append(info)
        raise ValueError("budget refused")

    streams[2].cache.begin_step = refuse
    with pytest.raises(RuntimeError, match="after 2 of 4 streams had stepped: budget refused"):
        run_micro_batches(streams, images, max_streams)
    assert calls
    assert all("later micro-batch" in s.broken for s in streams[:2])
    assert streams[2].broken is None and streams[3].broken is None  # refused before any work
    assert [s.frames_seen for s in streams] == [4, 4, 0, 0]
    streams[2].cache.begin_step = original


def test_failure_in_the_first_micro_batch_keeps_its_own_rule(tiny_model):
    runtime = TorchRuntime(tiny_model, STAC, max_batch_streams=2)
    streams = [runtime.open_stream() for _ in range(4)]
    images = [s.validate(torch.rand(4, 3, 56, 84)) for s in streams]

    def refuse(info):
        raise ValueError("budget refused")

    streams[0].cache.begin_step = refuse
    with pytest.raises(ValueError, match="budget refused"):
        runtime.step(streams, images)
    assert all(s.broken is None for s in streams)  # a ValueError: every stream as it was


# ------------------------------------------------------------------ admission counts a step's memory


class BoundedStream(RuntimeStream):
    def __init__(self, bound: int):
        self.bound = bound

    def validate(self, frames):
        return torch.as_tensor(frames)

    def memory_bytes(self) -> int:
        return 0

    def memory_bound(self, image_hw=None) -> Optional[int]:
        return self.bound

    def reset(self) -> None:
        pass


class StepMemoryRuntime(Runtime):
    """Streams bounded at 100 bytes; a step adds ``step_bytes[image_hw]``."""

    def __init__(self, step_bytes: dict):
        self.step_bytes = step_bytes
        self.asked = []

    def open_stream(self):
        return BoundedStream(100)

    def step(self, streams, images):
        return [{"depth": x} for x in images]

    def step_memory_bytes(self, image_hw):
        self.asked.append(tuple(image_hw))
        return self.step_bytes.get(tuple(image_hw))


def _start(sessions, cid, hw=(28, 28)):
    return sessions.handle([FrameRequest(corr_id=cid, start=True, end=False, frames=torch.zeros(4, 3, *hw, dtype=torch.uint8))])[0]


def test_admission_reserves_one_steps_memory_once():
    runtime = StepMemoryRuntime({(28, 28): 150, (28, 42): 250})
    sessions = StreamSessions(runtime, ServingLimits(max_streams=10, max_cache_bytes=500))
    # 150 for the step + 100 per stream: three streams fit (450), a fourth would need 550.
    assert all(isinstance(_start(sessions, cid), StepResult) for cid in (1, 2, 3))
    refused = _start(sessions, 4)
    assert isinstance(refused, RequestError)
    assert "450 of 500 bytes reserved (150 of them for one step's activations), a stream needs up to 100" in str(refused)
    assert (28, 28) in runtime.asked
    # A larger frame size needs more for its step: reserved at the largest size's need.
    sessions.close_all()
    assert isinstance(_start(sessions, 5, (28, 42)), StepResult)  # 250 + 100
    assert isinstance(_start(sessions, 6), StepResult)  # 250 + 200
    assert isinstance(_start(sessions, 7), RequestError)  # 250 + 300 > 500
    assert sessions.stats()["rejected_starts"] == 2


def test_admission_without_a_step_estimate_reserves_bounds_only():
    sessions = StreamSessions(StepMemoryRuntime({}), ServingLimits(max_streams=10, max_cache_bytes=300))
    assert all(isinstance(_start(sessions, cid), StepResult) for cid in (1, 2, 3))
    assert isinstance(_start(sessions, 4), RequestError)


def test_torch_runtime_reports_step_memory_only_when_steps_are_bounded(tiny_model):
    """No split: the peak grows with the streams stepped together, so there is no constant to reserve."""
    assert TorchRuntime(tiny_model, STAC, max_batch_streams=None).step_memory_bytes((28, 42)) is None
    assert TorchRuntime(tiny_model, STAC).step_memory_bytes((28, 42)) is None  # "auto" on the CPU: no split
    assert TorchRuntime(tiny_model, STAC, max_batch_streams=2).step_memory_bytes((28, 42)) is None  # CPU: after a warm-up


def test_warmup_measures_one_streams_step_outputs(tiny_model):
    """Finished micro-batches keep their outputs until the step returns: the runtime measures one
    stream's output bytes so that admission charges them per stream."""
    runtime = TorchRuntime(tiny_model, STAC, max_batch_streams=2)
    assert runtime.step_output_bytes((28, 42)) is None
    runtime.warmup((28, 42))
    stream = runtime.open_stream()
    outputs = runtime.step([stream], [stream.validate(torch.rand(4, 3, 28, 42))])[0]
    assert runtime.step_output_bytes((28, 42)) == sum(t.nbytes for t in outputs.values())
    assert TorchRuntime(tiny_model, STAC, max_batch_streams=None).step_output_bytes((28, 42)) is None
