"""Breakable CUDA graphs: one forward captured as several graph segments split around eager calls.

Some work cannot sit inside a CUDA graph: host synchronisations (``.item()``,
``torch.nonzero``), host-side bookkeeping, ops that allocate by data. Rather than
give up on graphs for the whole forward, a breakable capture ends the current
segment right before such a call, runs the call eagerly, and opens a new segment
after it. Replay walks the same list in order: graph, eager call, graph, ...

The rule that makes this sound: every tensor that crosses a break lives at a fixed
address. Graph segments replay with the addresses they were captured with, and an
eager call is re-run with the very tensors it was given at capture time, so it must
write its results into buffers it was handed, not return fresh tensors.

Only the thread-local capture state and the CUDA calls need a GPU; importing this
module on a CPU-only machine is fine.
"""

from __future__ import annotations

import functools
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, ContextManager, Hashable, Iterable, Mapping, Protocol, TypeVar, cast

import torch

from . import _torch_internals

__all__ = ["BreakableCUDAGraph", "BreakableGraphed", "ReplayGuard", "current_capture", "eager_break"]

_F = TypeVar("_F", bound=Callable[..., Any])

# Where an argument sits in a call: an index into the positional arguments or a keyword name.
ArgKey = int | str

_local = threading.local()


def current_capture() -> BreakableCUDAGraph | None:
    """The breakable capture active on this thread, or None."""
    return getattr(_local, "capture", None)


def _require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(f"{what} needs a CUDA device, but torch.cuda.is_available() is False")


def _require_no_capture(what: str) -> None:
    """Refuse to start while any capture is open here: CUDA cannot nest stream captures."""
    if current_capture() is not None:
        raise RuntimeError(
            f"{what}: a BreakableCUDAGraph capture is already active on this thread; "
            "breakable captures cannot be nested"
        )
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"{what}: the current CUDA stream is already capturing a CUDA graph; "
            "a breakable capture cannot run inside another capture"
        )


def _end_capture(graph: torch.cuda.CUDAGraph) -> bool:
    """End ``graph``'s capture; True if it captured nothing.

    torch only tells us a capture was empty through a warning. Two back-to-back
    breaks legitimately produce such a segment, so that warning is consumed here
    and every other warning is passed on.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph.capture_end()
    empty = False
    for warning in caught:
        if "CUDA Graph is empty" in str(warning.message):
            empty = True
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return empty


class BreakableCUDAGraph:
    """Captures the work run inside ``with`` on the current device as CUDA graph segments.

    The body runs on ``stream`` (a fresh side stream if None, since a capture may not
    run on the default stream), ordered after the work already queued on the caller's
    stream; on exit the caller's stream is ordered after the capture stream. Every
    segment allocates from one memory pool (``pool``, a new one if None), which is
    safe because the segments always replay in the order they were captured.

    Nothing captured into a segment runs during the capture; only the eager calls do,
    and they see whatever the buffers held. Call :meth:`replay` for real results.

    ``on_segment_end`` runs right before each segment's capture ends, while the
    stream is still capturing, so it can fold side streams (for instance a copy
    stream) back into the segment. It runs once per segment, including segments
    that turn out empty; it does not run when the body raised.

    One instance captures once. Only one breakable capture may be active per thread.
    """

    def __init__(
        self,
        pool: Any = None,
        stream: torch.cuda.Stream | None = None,
        on_segment_end: Callable[[], None] | None = None,
    ) -> None:
        self.pool = pool
        self.stream = stream
        self._on_segment_end = on_segment_end
        self._steps: list[Callable[[], Any]] = []  # graph replays and eager calls, in capture order
        self._graph: torch.cuda.CUDAGraph | None = None  # the segment being captured, if one is open
        # Every ended segment, empty ones too: freeing a graph of the shared pool while
        # later segments capture into it trips the caching allocator's pool accounting.
        self._segments: list[torch.cuda.CUDAGraph] = []
        self._stream_context: torch.cuda.StreamContext | None = None
        self._caller_stream: torch.cuda.Stream | None = None
        self._state = "new"  # new -> capturing -> captured | failed
        self._num_graphs = 0
        self._num_eager = 0

    @property
    def num_graphs(self) -> int:
        """Non-empty graph segments kept for replay."""
        return self._num_graphs

    @property
    def num_eager(self) -> int:
        """Eager calls recorded for replay (each one is a break between two segments)."""
        return self._num_eager

    def __repr__(self) -> str:
        return f"BreakableCUDAGraph({self._state}, graphs={self._num_graphs}, eager={self._num_eager})"

    # ------------------------------------------------------------------ capture
    def __enter__(self) -> BreakableCUDAGraph:
        if self._state != "new":
            raise RuntimeError(f"this BreakableCUDAGraph is {self._state}; it captures once, create a new one")
        _require_cuda("BreakableCUDAGraph")
        _require_no_capture("BreakableCUDAGraph")
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        self._caller_stream = torch.cuda.current_stream()
        self.stream.wait_stream(self._caller_stream)
        self._stream_context = torch.cuda.stream(self.stream)
        self._stream_context.__enter__()
        _local.capture = self
        self._state = "capturing"
        try:
            self._begin_segment()
        except BaseException:
            self._leave(ok=False)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        ok = False
        try:
            if exc_type is None:
                if self._graph is None:
                    raise RuntimeError(
                        "BreakableCUDAGraph: an eager call raised during the capture and the body went on; "
                        "the capture is incomplete"
                    )
                self._end_segment()
                ok = True
            elif self._graph is not None:
                self._abandon_segment()
        finally:
            self._leave(ok)

    def _leave(self, ok: bool) -> None:
        """Undo what entering did, whatever happened in between, so the thread stays usable."""
        assert self._stream_context is not None and self._caller_stream is not None and self.stream is not None
        self._stream_context.__exit__(None, None, None)
        self._caller_stream.wait_stream(self.stream)
        _local.capture = None
        self._state = "captured" if ok else "failed"
        if not ok:
            self._steps.clear()

    def _begin_segment(self) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool)
        self._graph = graph

    def _end_segment(self) -> None:
        graph, self._graph = self._graph, None
        assert graph is not None
        try:
            if self._on_segment_end is not None:
                self._on_segment_end()
        finally:
            empty = _end_capture(graph)
        self._segments.append(graph)
        if not empty:
            self._steps.append(graph.replay)
            self._num_graphs += 1

    def _abandon_segment(self) -> None:
        """Close the open segment after the body raised; that error is the one worth reporting."""
        graph, self._graph = self._graph, None
        assert graph is not None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph.capture_end()
        except RuntimeError:
            pass  # the failure in the body usually invalidated the capture too

    def add_eager(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """End the current segment, run ``fn(*args, **kwargs)`` eagerly, record it for replay, open a new segment.

        Returns what ``fn`` returned at capture time. Replay discards return values,
        so anything later work reads must be written into buffers passed to ``fn``.
        Called from inside an eager call, ``fn`` just runs: it is part of that call.
        """
        if self._state != "capturing":
            raise RuntimeError(f"add_eager needs an active capture; this BreakableCUDAGraph is {self._state}")
        if self._graph is None:
            return fn(*args, **kwargs)
        self._end_segment()
        call = functools.partial(fn, *args, **kwargs)
        result = call()
        self._steps.append(call)
        self._num_eager += 1
        self._begin_segment()
        return result

    # ------------------------------------------------------------------ replay
    def replay(self) -> None:
        """Replay the segments and eager calls in capture order on the current stream."""
        if self._state != "captured":
            raise RuntimeError(f"cannot replay a BreakableCUDAGraph that is {self._state}")
        for step in self._steps:
            step()


def eager_break(fn: _F) -> _F:
    """Make ``fn`` a break point of a breakable capture.

    Outside an active :class:`BreakableCUDAGraph` the call runs untouched. Inside one
    it goes through :meth:`BreakableCUDAGraph.add_eager`: it runs eagerly between two
    graph segments, and again at every replay with the same arguments.

    ``fn`` must write its results into caller-provided output tensors allocated before
    the call (static buffers). A tensor it returns is created afresh at every replay
    and nothing downstream sees it: the graph segments after the break keep reading
    the tensor returned at capture time, which replay leaves as it was.

    The wrapper is hidden from torch.compile (``torch.compiler.disable``): whether to
    break can only be decided when the call happens, never at trace time.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        capture = current_capture()
        if capture is None:
            return fn(*args, **kwargs)
        return capture.add_eager(fn, *args, **kwargs)

    return cast(_F, torch.compiler.disable(wrapper))


# ---------------------------------------------------------------------- wrapper
def _arg(args: tuple[Any, ...], kwargs: Mapping[str, Any], key: ArgKey) -> Any:
    return args[key] if isinstance(key, int) else kwargs[key]


def _arg_items(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Iterable[tuple[ArgKey, Any]]:
    """Positional arguments by index, then keyword arguments by sorted name (call order must not matter)."""
    yield from enumerate(args)
    yield from sorted(kwargs.items())


def _signature_of(key: ArgKey, value: Any) -> Hashable:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device, value.requires_grad)
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            f"BreakableGraphed: argument {key!r} ({type(value).__name__}) is not hashable; "
            "non-tensor arguments pick the captured graph by value"
        ) from None
    return ("value", type(value), value)  # the type keeps 1, 1.0 and True apart


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to the tensors in (nested) tuples, namedtuples, lists and dicts; anything else as is."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        items = [_map_tensors(item, fn) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if type(value) is list:
        return [_map_tensors(item, fn) for item in value]
    if type(value) is dict:
        return {name: _map_tensors(item, fn) for name, item in value.items()}
    return value


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter; None for an inference tensor, which keeps none.

    An inference tensor's writes cannot be seen, so it is treated as written: copying
    back a buffer that holds the caller's own values changes nothing but costs a copy.
    """
    try:
        return tensor._version
    except RuntimeError:
        return None


class ReplayGuard(Protocol):
    """State kept outside a captured graph that must agree with it at every replay.

    A replay runs no Python: whatever Python-side bookkeeping the captured code
    did during the capture is not redone. An owner of such state implements this
    protocol and :class:`BreakableGraphed` tells it about each step: the eager
    warm-up call, the capture (which must leave the Python state as it found it,
    since nothing captured has run), and each replay (before it: make the device
    state what the capture assumed; after it: make the Python state what the
    replay did).
    """

    def warmup(self) -> ContextManager[None]: ...

    def begin_capture(self) -> None: ...

    def end_capture(self, ok: bool) -> Any: ...

    def before_replay(self, token: Any) -> None: ...

    def after_replay(self, token: Any) -> None: ...


@dataclass
class _Entry:
    """One captured signature: the capture and the fixed-address tensors it was captured with."""

    capture: BreakableCUDAGraph
    device: torch.device
    outputs: Any  # what fn returned at capture time; replay rewrites its tensors in place
    handout: _Handout  # what a replay returns of them
    copied: list[tuple[ArgKey, torch.Tensor]] = field(default_factory=list)  # static buffers refilled each call
    mutated: list[tuple[ArgKey, torch.Tensor]] = field(default_factory=list)  # copied buffers fn writes to
    pinned: list[tuple[ArgKey, torch.Tensor]] = field(default_factory=list)  # caller tensors read in place
    token: Any = None  # what the guard's end_capture returned


class _Handout:
    """Whether a signature's replays return its static output tensors or clones of them, learned from the caller.

    A replay rewrites the same output tensors every time, so handing them out is
    safe only while the caller lets go of one call's outputs before its next call
    (the usual loop; HF ``generate`` deletes each step's outputs). Replays return
    clones until the caller is seen to have dropped the last clones by its next
    call; from then on they return aliases of the static tensors, which saves a
    clone's time and its memory (an output's worth, the logits of a long prefill).
    Should the caller keep an alias, or a view of one, after all, the call that
    would overwrite it runs eagerly instead (fresh outputs; the held ones stay
    as they were) and the signature returns clones for good. So at most one call
    per signature falls back to eager, and no output is ever overwritten.

    Holding is seen from storage use counts: each hand-out is a new tensor
    (``detach``) on the static storage, so a kept alias or view adds a use that
    the count taken just before the first alias was made did not have (taken
    then, not at capture time, when a transient alias of the capture could
    inflate it and hide a kept one). Outputs that alias a tensor
    the graph reads in place (a KV cache, a weight) are not the graph's to
    overwrite and are handed out as aliases, as an eager call would.
    """

    def __init__(self, watched: tuple[torch.Tensor, ...], shared: tuple[int, ...]) -> None:
        self._watched = watched  # one static output per storage the replay writes
        self._baseline: tuple[int, ...] | None = None  # their use counts with no alias handed out, once one is
        self._shared = frozenset(shared)  # storages (data pointers) of the tensors read in place
        self._settled = False  # clones for good, after a held hand-out (so only once a baseline exists)
        self._clones: list[weakref.ref[torch.Tensor]] = []

    @classmethod
    def of(cls, outputs: Any, pinned: Iterable[torch.Tensor]) -> _Handout:
        shared = tuple(t.untyped_storage().data_ptr() for t in pinned)
        watched: dict[int, torch.Tensor] = {}
        _map_tensors(outputs, lambda t: watched.setdefault(t.untyped_storage().data_ptr(), t))
        return cls(tuple(t for ptr, t in watched.items() if ptr not in shared), shared)

    def held(self) -> bool:
        """Whether the caller still holds a static output handed out earlier (the next replay would overwrite it)."""
        if self._baseline is None:
            return False  # none handed out yet
        if self._use_counts() == self._baseline:
            return False
        self._settled = True
        return True

    def hand_out(self, outputs: Any) -> Any:
        """What one replay returns: aliases of the static outputs, or clones while that is not known to be safe."""
        if self._baseline is None and self._clones and all(ref() is None for ref in self._clones):
            self._baseline = self._use_counts()  # the graph's own uses alone: no alias exists yet
        if self._baseline is not None and not self._settled:
            return _map_tensors(outputs, torch.Tensor.detach)
        self._clones.clear()

        def clone(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() in self._shared:
                return t.detach()
            copy = t.clone()
            if not self._settled:
                self._clones.append(weakref.ref(copy))
            return copy

        return _map_tensors(outputs, clone)

    def _use_counts(self) -> tuple[int, ...]:
        return tuple(_torch_internals.storage_use_count(t) for t in self._watched)


class BreakableGraphed:
    """Run ``fn`` as a breakable CUDA graph, one capture per input signature.

    The signature of a call is the shape, dtype, device and requires_grad of each
    tensor argument, the address of each argument read in place, plus the value
    (and type) of every other argument; tensors must be passed as top-level
    arguments, not inside containers. The first ``warmup`` calls of a signature
    run ``fn`` eagerly on a side stream (lazy initialisation, such as cuBLAS
    workspaces, happens there and outside any capture) and return its results.
    The next call copies the tensor arguments into static buffers, captures
    ``fn`` once with :class:`BreakableCUDAGraph` and replays it; later calls copy
    the new tensor arguments into the static buffers and replay. Each call thus
    executes ``fn``'s work exactly once, which matters to a ``fn`` that updates
    its inputs in place. Calls with ``eager_break`` functions inside get their
    graph split there.

    ``static_inputs`` names arguments (positional index or keyword name) that the
    graph reads in place instead of through a copy, such as weights or caches that
    are updated in place. Their addresses are part of the signature: a tensor at a
    new address gets a capture of its own, never a replay that reads the old one.
    With ``debug=True`` such a move raises instead, to catch an unintended one.

    A copied argument that ``fn`` writes to (its version counter moves while
    ``fn`` is captured: an in-place update, such as a KV cache written at the
    current position) is copied back to the caller's tensor after each replay,
    so the write is not lost in the static buffer. Inference tensors keep no
    version counter, so under ``torch.inference_mode`` every copied argument is
    copied back (a no-op in value for those ``fn`` does not write).

    Replays return clones of the static outputs, or, once the caller is seen to
    drop each call's outputs before the next call, the static outputs themselves
    (see :class:`_Handout`); no replay overwrites an output the caller still
    holds. Tensors are found in tuples, lists and dicts; other
    values are returned as captured. Only the forward is supported: it runs under
    ``torch.no_grad()``, and replays of graphs sharing a pool must not run concurrently.

    ``guard`` (a :class:`ReplayGuard`) is told about every warm-up, capture and replay.

    Without CUDA, or when a tensor argument is not on a CUDA device, a call simply
    runs ``fn`` eagerly. Calling it while a capture is open on this thread raises.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        debug: bool = False,
        pool: Any = None,
        on_segment_end: Callable[[], None] | None = None,
        warmup: int = 1,
        static_inputs: Iterable[ArgKey] = (),
        guard: ReplayGuard | None = None,
    ) -> None:
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.fn = fn
        self.debug = debug
        self.pool = pool
        self.on_segment_end = on_segment_end
        self.warmup = warmup
        self.static_inputs = frozenset(static_inputs)
        self.guard = guard
        self._entries: dict[Hashable, _Entry] = {}
        self._warmups: dict[Hashable, int] = {}
        self._stream: torch.cuda.Stream | None = None
        self._captured_at: dict[Hashable, dict[ArgKey, int]] = {}  # static addresses per shape signature (debug)

    @property
    def captures(self) -> Mapping[Hashable, BreakableCUDAGraph]:
        """The capture of each signature seen so far (read-only view)."""
        return MappingProxyType({signature: entry.capture for signature, entry in self._entries.items()})

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        items = list(_arg_items(args, kwargs))
        tensors = [value for _, value in items if isinstance(value, torch.Tensor)]
        if not torch.cuda.is_available() or any(t.device.type != "cuda" for t in tensors):
            return self.fn(*args, **kwargs)
        _require_no_capture("BreakableGraphed")
        signature = tuple((key, self._signature_of(key, value)) for key, value in items)
        device = tensors[0].device if tensors else torch.device("cuda", torch.cuda.current_device())
        if self.debug:
            self._check_static_addresses(items)
        seen = self._warmups.get(signature, 0)
        if seen < self.warmup:
            self._warmups[signature] = seen + 1
            return self._run_eagerly(args, kwargs, device, last_warmup=seen + 1 == self.warmup)
        entry = self._entries.get(signature)
        if entry is None:
            entry = self._capture(args, kwargs, device)
            self._entries[signature] = entry
        elif entry.handout.held():
            return self._run_eagerly(args, kwargs, device, last_warmup=False)
        self._refill(entry, args, kwargs)
        with torch.no_grad(), torch.cuda.device(entry.device):
            if self.guard is not None:
                self.guard.before_replay(entry.token)
            entry.capture.replay()
            if self.guard is not None:
                self.guard.after_replay(entry.token)
            for key, buffer in entry.mutated:
                _arg(args, kwargs, key).copy_(buffer)
            return entry.handout.hand_out(entry.outputs)

    def _signature_of(self, key: ArgKey, value: Any) -> Hashable:
        signature = _signature_of(key, value)
        if key in self.static_inputs and isinstance(value, torch.Tensor):
            return (signature, value.data_ptr())
        return signature

    def _side_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def _run_eagerly(self, args: tuple[Any, ...], kwargs: dict[str, Any], device: torch.device, last_warmup: bool) -> Any:
        """A warm-up call: ``fn`` on the caller's own tensors, on the side stream that will capture."""
        with torch.no_grad(), torch.cuda.device(device):
            caller = torch.cuda.current_stream()
            stream = self._side_stream()
            stream.wait_stream(caller)
            with torch.cuda.stream(stream):
                if last_warmup and self.guard is not None:
                    with self.guard.warmup():
                        outputs = self.fn(*args, **kwargs)
                else:
                    outputs = self.fn(*args, **kwargs)
            caller.wait_stream(stream)
        return outputs

    def _capture(self, args: tuple[Any, ...], kwargs: dict[str, Any], device: torch.device) -> _Entry:
        entry_args = list(args)
        entry_kwargs = dict(kwargs)
        copied: list[tuple[ArgKey, torch.Tensor]] = []
        pinned: list[tuple[ArgKey, torch.Tensor]] = []
        for key, value in _arg_items(args, kwargs):
            if key in self.static_inputs:
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"BreakableGraphed: static input {key!r} is a {type(value).__name__}, not a tensor")
                pinned.append((key, value))
            elif isinstance(value, torch.Tensor):
                buffer = value.detach().clone()
                copied.append((key, buffer))
                if isinstance(key, int):
                    entry_args[key] = buffer
                else:
                    entry_kwargs[key] = buffer

        with torch.no_grad(), torch.cuda.device(device):
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            # Work queued outside the graph (warm-ups, copies on other streams) cannot be
            # waited on from inside a capture, and the first replay follows right after it.
            torch.cuda.synchronize(device)
            versions = [_version(buffer) for _, buffer in copied]
            capture = BreakableCUDAGraph(pool=self.pool, stream=self._side_stream(), on_segment_end=self.on_segment_end)
            if self.guard is not None:
                self.guard.begin_capture()
            ok = False
            try:
                with capture:
                    outputs = self.fn(*entry_args, **entry_kwargs)
                ok = True
            finally:
                token = self.guard.end_capture(ok) if self.guard is not None else None
        mutated = [
            (key, buffer)
            for (key, buffer), version in zip(copied, versions)
            if version is None or _version(buffer) != version
        ]
        handout = _Handout.of(outputs, (tensor for _, tensor in pinned))
        return _Entry(capture, device, outputs, handout, copied, mutated, pinned, token)

    def _check_static_addresses(self, items: list[tuple[ArgKey, Any]]) -> None:
        """debug=True: a static input seen before at another address is an error, not a new capture."""
        shapes = tuple((key, _signature_of(key, value)) for key, value in items)
        addresses = {key: value.data_ptr() for key, value in items if key in self.static_inputs and isinstance(value, torch.Tensor)}
        captured = self._captured_at.setdefault(shapes, addresses)
        for key, now in addresses.items():
            if captured.get(key, now) != now:
                raise RuntimeError(
                    f"BreakableGraphed: static input argument {key!r} moved: captured at "
                    f"0x{captured[key]:x}, passed at 0x{now:x}. The graph reads the captured "
                    "tensor in place; update that tensor instead, or leave the argument out of static_inputs."
                )

    def _refill(self, entry: _Entry, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Bring the new call's tensors to the addresses the graph reads."""
        with torch.no_grad():
            for key, buffer in entry.copied:
                buffer.copy_(_arg(args, kwargs, key))
