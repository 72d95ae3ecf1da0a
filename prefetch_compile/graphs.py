"""CUDA graphs of compiled graphs that read offloaded weights (the ``cuda_graphs=True`` option).

Each compiled graph is captured per input signature by
:class:`~prefetch_compile.breakable_graph.BreakableGraphed` and replayed. A
replay updates no Python state: the runtime's record of which layer each slot
holds is not touched by it, and the Python bodies of ``wait_prefetch`` and
``start_prefetch`` do not run. :class:`SlotGuard` therefore keeps the two
sides in agreement at every point where they could part:

* **capture**: the slot owners the capture starts from and ends with are
  snapshotted; the Python state is put back afterwards, because nothing
  captured has run yet.
* **before each replay**: slots whose owner changed since the capture (an
  eager block call, a forward that raised, another graph's Python path) are
  refilled with the layer the graph expects, on the compute stream.
* **after each replay**: the runtime learns the owners the replay left.

Prefetches that cross the end of the graph (the wrap-around copies of a
forward's first layers, or a layer read by the next graph) are not captured:
the warm-up call shows which starts (whole layers, or chunks of one when the
copies are chunked) have no wait for any of their pieces later in the same
graph, and those are issued eagerly right after each replay, in the order the
graph started them, each behind the copies the graph made before its start
(an external event recorded on the copy stream at that point), as in the
graph's own copy stream. The next forward's graph waits for them through external
events (wait nodes on the runtime's persistent per-piece events), so the
copies overlap the host's work between calls instead of being joined at the
graph's end. Chunked copies are captured and deferred like whole ones.

Inputs: the model's parameters and buffers, and tensors Dynamo was told have
static addresses (``torch._dynamo.mark_static_address``, as HF's static KV
cache does), are read in place; other tensors are copied into static buffers,
and written back after the replay if the graph updated them in place.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from . import _torch_internals
from .breakable_graph import BreakableGraphed
from .runtime import CaptureLog, ChunkKey, PrefetchRuntime, SlotState


@dataclass(frozen=True)
class _CaptureToken:
    start: SlotState  # the slots the graph was captured against
    end: SlotState  # the slots a replay leaves
    log: CaptureLog


class SlotGuard:
    """The :class:`~prefetch_compile.breakable_graph.ReplayGuard` of one compiled graph of one runtime."""

    def __init__(self, runtime: PrefetchRuntime) -> None:
        self.runtime = runtime
        self._deferred: tuple[ChunkKey, ...] = ()
        self._start: SlotState | None = None

    @contextmanager
    def warmup(self) -> Iterator[None]:
        """Learn which starts of this graph have no wait for any of their pieces after them in the same graph."""
        with self.runtime.tracing_ops() as trace:
            yield
        waited_after: set[tuple[int, int]] = set()
        crossing: list[ChunkKey] = []
        for kind, index, pieces in reversed(trace):
            if kind == "wait":
                waited_after.update((index, piece) for piece in pieces)
            elif not any((index, piece) in waited_after for piece in pieces):
                crossing.append((index, pieces.start, pieces.stop))
        self._deferred = tuple(dict.fromkeys(reversed(crossing)))

    def begin_capture(self) -> None:
        self._start = self.runtime.snapshot()
        self.runtime.begin_capture(self._deferred)

    def end_capture(self, ok: bool) -> _CaptureToken | None:
        assert self._start is not None
        end, log = self.runtime.end_capture(self._start)
        return _CaptureToken(self._start, end, log) if ok else None

    def before_replay(self, token: _CaptureToken) -> None:
        self.runtime.restore_slots(token.start.owners)

    def after_replay(self, token: _CaptureToken) -> None:
        self.runtime.after_replay(token.end, token.log)


def graphed(run: Callable[..., Any], runtime: PrefetchRuntime, example_inputs: list[Any]) -> Callable[..., Any]:
    """Capture ``run`` (one compiled graph) per input signature and replay it, under the runtime's lock."""
    model_tensors = {id(t) for t in [*runtime.offloaded_params.values(), *runtime.kept_tensors.values()]}
    static = [
        index
        for index, value in enumerate(example_inputs)
        if id(value) in model_tensors or _torch_internals.has_static_address(value)
    ]
    replayed = BreakableGraphed(run, static_inputs=static, on_segment_end=runtime.join_capture, guard=SlotGuard(runtime))

    def replay(*args: Any) -> Any:
        with runtime.serving("a CUDA graph replay"):
            return replayed(*args)

    return replay
