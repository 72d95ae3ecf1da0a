"""The prefetch runtime of one offloaded model: copy stream, slot ownership, copy events, counters.

``start`` and ``wait`` are the bodies of the custom ops that the prefetch pass
inserts; the eager block hooks and the CUDA-graph replays call them too.

* ``start(i, pieces)`` copies those pieces of offload index ``i``'s block (all
  of them by default) from the host arena into its slot, on the copy stream,
  ordered after everything already queued on the compute stream (so after the
  last reader of the same pieces of the slot's previous layer).
* ``wait(i, pieces)`` orders the compute stream after those copies. It is also
  an *ensure*: when the slot holds another layer's bytes there (a graph break
  inside a block, an eager block call, a forward that raised half way), it
  copies them on the spot, counts a miss in :attr:`PrefetchRuntime.counters`
  and logs a warning once per graph. A miss costs speed, never correctness,
  and is never silent.

A layer's pieces (``plan.pieces``) are one whole block unless the plan chunks
its copies; the ops of a chunked schedule each name a run of pieces through the
parameters they are given (:meth:`PrefetchRuntime.chunk_of`). Every byte of
every offloaded layer that shares its slot is copied exactly once per forward:
layer ``i`` prefetches the next layer that uses its slot
(``plan.next_in_slot``), piece by piece as it finishes reading each, and the
last layer of each slot prefetches that slot's first layer for the next forward.

Python state vs. device state. ``_owners`` says which layer each piece of each
slot holds or is being filled with, as far as the work queued so far goes.
Eager calls and compiled graphs keep it exact because the ops run in Python. A
CUDA graph replay runs no Python at all, so :mod:`prefetch_compile.graphs`
snapshots the owners a capture starts from and ends with, restores the former
before each replay (:meth:`restore_slots`) and installs the latter after it.

One lock per runtime serialises the model's forwards across threads: the slot
pool is shared state, so two threads may not interleave their copies and reads.
Each entry from outside (:meth:`PrefetchRuntime.acquire`) first settles the
in-place edits of offloaded parameters made since the last one: kept in the host
arena, or refused by name (:mod:`prefetch_compile.edits`).

On the CPU the same code runs with synchronous copies, which makes any ordering
mistake of the pass show up as wrong numbers.
"""

from __future__ import annotations

import logging
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Sequence

import torch

from . import _torch_internals
from .cuda_driver import HostToDevice
from .edits import CopyWatch, EditWatch, InPlaceEditError, refusal
from .leaves import get_inner, leaf_bytes
from .memory import HostArena, SlotPool, aliased_param_view, param_view
from .plan import LayerPlan, OffloadPlan, ParamPlacement

if TYPE_CHECKING:
    from .cost_model import CostTable
    from .disk_tier import DiskTier, StagedLayer
    from .report import CopyRecorder, CopyReport

log = logging.getLogger("prefetch_compile")


@dataclass(frozen=True)
class OffloadStats:
    """What offloading moved where, in layers and bytes."""

    total_layers: int
    offloaded_layers: int
    offloaded_bytes: int  # parameter bytes that no longer live on the device
    host_pinned_bytes: int  # the host arena, padded to the plan's alignment; 0 on the CPU, where it is not pinned
    slot_pool_bytes: int  # device memory spent on the slots
    kept_device_bytes: int  # parameters and buffers that stay on the device
    disk_layers: int = 0  # offloaded layers read from the checkpoint files at every forward (the disk tier)
    disk_bytes: int = 0  # their parameter bytes: what each forward reads from disk
    staging_bytes: int = 0  # the disk tier's staging ring (host memory, pinned on a GPU)

    @property
    def device_bytes_saved(self) -> int:
        return self.offloaded_bytes - self.slot_pool_bytes


@dataclass
class CopyCounters:
    """What the runtime did since the model was offloaded (or since :meth:`reset`).

    ``copies`` counts host-to-device copies, each of a whole layer or of a run
    of its pieces (a chunk), and ``copied_bytes`` the bytes they moved: a
    forward moves each offloaded layer of a shared slot once, in one copy or in
    several. ``ensure_misses`` counts the waits that found their bytes absent
    and copied them on the spot (each such copy is also in ``copies``);
    ``restores`` the copies made before a CUDA graph replay because Python code
    changed the slots since the capture.
    """

    copies: int = 0
    copied_bytes: int = 0
    ensure_misses: int = 0
    restores: int = 0
    misses_by_graph: dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.copies = self.copied_bytes = self.ensure_misses = self.restores = 0
        self.misses_by_graph.clear()


@dataclass(frozen=True)
class CompileRecord:
    """What the prefetch pass did to one compiled graph."""

    graph: str  # Dynamo's compile id
    waits: int  # one per offloaded layer the graph reads
    ops_inserted: int
    seconds: float  # time spent in the pass

    def __str__(self) -> str:
        return (
            f"graph {self.graph}: {self.waits} offloaded layers waited for, "
            f"{self.ops_inserted} ops inserted in {self.seconds * 1e3:.1f} ms"
        )


@dataclass(frozen=True)
class _InFlight:
    """A copy issued on the copy stream and not yet waited for by the compute stream."""

    done: torch.cuda.Event
    in_capture: bool  # recorded inside a CUDA graph capture: only usable inside that capture


@dataclass(frozen=True)
class _OpChunk:
    """What a prefetch op's first and last parameters resolve to (see :meth:`PrefetchRuntime.wait_op`)."""

    offload_index: int
    pieces: range  # the run of the layer's pieces the op names
    following: int  # the offload index that start_prefetch brings into those bytes of the slot
    address: int  # where the first parameter must point, in its slot


@dataclass(frozen=True)
class _Copies:
    """What bringing some pieces of a layer into its slot takes: one memcpy per (source, target) pair."""

    pairs: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # host (arena or staging) bytes, slot bytes
    count: int  # copies, as the counters count them: runs of adjacent pieces, or one for a disk-resident layer
    nbytes: int

    @cached_property  # a host-resident layer's copies are made once and kept (_host_copies), and so is this
    def memcpys(self) -> tuple[tuple[int, int, int], ...]:
        """Each pair as the driver's copy takes it: (target address, source address, bytes)."""
        return tuple((target.data_ptr(), source.data_ptr(), source.numel()) for source, target in self.pairs)

    @property
    def memcpy_bytes(self) -> list[int]:
        """The bytes of each memcpy the pairs make (uint8 views: one memcpy each), for the report and captures."""
        return [source.numel() for source, _ in self.pairs]


# A run of pieces of one offloaded block, as a start or a wait names it: (offload index, first piece, end piece).
ChunkKey = tuple[int, int, int]


@dataclass
class SlotState:
    """A snapshot of the Python-side slot state, taken around a CUDA graph capture."""

    owners: tuple[tuple[int | None, ...], ...]  # per slot, the offload index each piece holds
    in_flight: dict[tuple[int, int], _InFlight]  # by (offload index, piece)


@dataclass
class CaptureLog:
    """What the ops did while a CUDA graph was being captured."""

    deferred: tuple[ChunkKey, ...]  # starts left out of the graph, issued eagerly after each replay, in this order
    consumed: set[tuple[int, int]] = field(default_factory=set)  # (offload index, piece) of eager copies the graph waits for
    copies: int = 0  # copies captured into the graph: each replay makes them again
    copied_bytes: int = 0
    memcpys: list[tuple[int, int]] = field(default_factory=list)  # theirs, as (offload index, bytes), in capture order
    freed: set[ChunkKey] = field(default_factory=set)  # deferred starts whose slot-free point the graph records
    tails: list[torch.cuda.Event] = field(default_factory=list)  # copy-stream work to join before a segment ends
    behind_deferred: bool = False  # this segment's copy stream waits for the deferred copies (_queue_behind_deferred)


class PrefetchRuntime:
    """Moves offloaded layers between the host arena and the slot pool, in stream order."""

    def __init__(
        self,
        plan: OffloadPlan,
        device: torch.device,
        host: HostArena,
        slots: SlotPool,
        offloaded_params: Mapping[str, torch.nn.Parameter],
        kept_tensors: Mapping[str, torch.Tensor],
        disk: DiskTier | None = None,
    ) -> None:
        if device.type == "cuda" and host.nbytes and not host.pinned:
            raise ValueError(
                "the host arena must be page-locked for a CUDA device: a non_blocking copy from pageable "
                "memory synchronises the stream, which breaks the copy/compute ordering and the overlap"
            )
        self.plan = plan
        self.device = device
        self.host = host
        self.slots = slots
        self.disk = disk  # the offloaded layers read from disk instead of the host arena, if any
        self.budget: int | None = None  # the device-memory budget (bytes) the planner chose the plan within, if any
        self.cost_table: CostTable | None = None  # the costs the planner chose it from (offload_within_budget)
        self._model: weakref.ReferenceType[torch.nn.Module] | None = None  # the offloaded model: bind_model()
        self._aliases: dict[str, str] | None = None  # tied names -> the kept name (_tied_aliases)
        self.offloaded: tuple[LayerPlan, ...] = plan.offloaded
        self.offloaded_params = dict(offloaded_params)
        self.kept_tensors = dict(kept_tensors)
        self.counters = CopyCounters()
        self.compiles: list[CompileRecord] = []  # one per graph compiled against this runtime
        self.lock = threading.RLock()
        self._graphs: list[str] = []  # the graphs holding the lock, innermost last
        # Offloaded blocks whose eager call (a block run after a graph break) is in progress: see start().
        self._blocks_running: list[int] = []
        self._held_starts: list[tuple[int, range]] = []  # starts that would have evicted a running block
        # By identity: each offloaded parameter (what Dynamo's graphs take as inputs) and each of its
        # leaf tensors (what AOT's flattened graphs take, for a subclass parameter; see leaves.py).
        self._param_locations: dict[int, tuple[int, str]] = {}
        self._pieces_of: dict[int, tuple[int, int]] = {}  # the same tensors -> (offload index, piece)
        self._addresses: dict[int, int] = {}  # each leaf -> the address in its slot it must view
        self._leaves: list[torch.Tensor] = []
        # Parameter name -> its leaves' (layer, placement): one leaf for a dense parameter.
        self._placements: dict[str, list[tuple[LayerPlan, ParamPlacement]]] = {}
        for layer in self.offloaded:
            for placement in layer.params:
                self._placements.setdefault(placement.param_name, []).append((layer, placement))
                param = self.offloaded_params[placement.param_name]
                leaf = get_inner(param, placement.inner)
                self._param_locations[id(param)] = (layer.offload_index, placement.param_name)
                self._param_locations[id(leaf)] = (layer.offload_index, placement.name)
                self._pieces_of[id(param)] = self._pieces_of[id(leaf)] = (layer.offload_index, plan.piece_of(placement))
                self._addresses[id(leaf)] = slots.block(layer).data_ptr() + placement.offset
                self._leaves += [param, leaf]
        self.edits = EditWatch(self._placements, self.offloaded_params)  # in-place edits, seen at settle_edits()
        self.disk_copies = CopyWatch()  # disk-resident values handed out by host_value(), whose writes are lost
        # The host-resident values handed out by host_value() (each on a storage of its own that aliases the
        # arena, so a counter of its own): a write into one is a write into the host copies, seen at settle_edits().
        self.host_values = CopyWatch()
        # The host arena's version counter (shared by every view of it) as the runtime last saw it: a move is a
        # write into host copies through the arena itself, seen at settle_edits().
        self._host_version = host.buffer._version
        self._pieces = tuple(plan.pieces(layer) for layer in self.offloaded)  # (begin, end) of each piece, per layer
        self._copies: dict[tuple[int, tuple[int, ...]], _Copies] = {}  # by (offload index, pieces): _host_copies
        self._all_pieces = range(len(plan.piece_starts))
        self._cuda = device.type == "cuda"
        self._cu = _torch_internals.cuda_calls() if self._cuda else None  # the copy path's C entry points
        self._h2d = HostToDevice() if self._cuda else None  # the copies themselves
        self.copy_stream = torch.cuda.Stream(device) if self._cuda else None
        self._copy_handle = self.copy_stream.cuda_stream if self._cuda else None
        self._device_index = self.copy_stream.device_index if self._cuda else None
        self._op_chunks: dict[tuple[int, int], _OpChunk] = {}  # by the ids of an op's first and last parameter
        # Orders an eager copy after the compute stream's queued work. One event serves every such copy: a
        # stream's wait_event waits for the record made before the wait call, so re-recording it for the next
        # copy does not move an earlier wait (a fresh event per copy cost the first forwards' host time).
        self._fork = torch.cuda.Event() if self._cuda else None
        # One persistent event per piece of each offloaded layer for copies issued outside a capture. They
        # are "external": a capture that waits on one records a wait node for the event itself, so a replay
        # waits for whatever copy last recorded it (the prefetch issued after the previous replay).
        self._ready = [self._external_events() for _ in self.offloaded]
        # The in-flight record of each piece's copy outside a capture, made once: its event is the piece's _ready.
        self._flights = [[_InFlight(event, False) for event in events] for events in self._ready]
        # Recorded inside a capture, on the copy stream, where a deferred prefetch of a chunk (keyed by
        # its first piece) would have started: after the last reader of those bytes of the slot and after
        # every copy the graph made before that point, for the copy issued after the replay to wait on.
        self._freed = [self._external_events() for _ in self.offloaded]
        self._owners: list[list[int | None]] = [[None] * len(self._all_pieces) for _ in range(plan.num_slots)]
        self._in_flight: dict[tuple[int, int], _InFlight] = {}
        # The compute stream the last entry found current, and its raw handle: see _current_stream().
        self._compute_stream: torch.cuda.Stream | None = None
        self._compute_handle: int | None = None
        self._capture: CaptureLog | None = None
        self._trace: list[tuple[str, int, range]] | None = None
        self.recorder: CopyRecorder | None = None  # told of every copy and wait (see start_recording)
        self._recording: CopyRecorder | None = None  # the last start_recording()'s, running or stopped
        # Records the first timed forwards (after the last compile) for one log line and first_report, until
        # start_recording().
        self._first_forwards: CopyRecorder | None = None
        self.first_report: CopyReport | None = None
        if self.offloaded:
            from .report import FIRST_TIMED_FORWARDS, CopyRecorder

            window = range(2, 2 + FIRST_TIMED_FORWARDS)  # the first forward compiles
            # A forward waits once or twice (graph and eager hook) per piece of each offloaded layer.
            max_waits = 8 * (window.stop + 1) * len(self.offloaded) * len(self._all_pieces)
            self.recorder = self._first_forwards = CopyRecorder(self.offloaded, device, window, max_waits)
        for tensor in self._leaves:
            setattr(tensor, OWNER_ATTRIBUTE, self)

    def _external_events(self) -> list[torch.cuda.Event]:
        return [torch.cuda.Event(external=True) for _ in self._all_pieces] if self._cuda else []

    # ----------------------------------------------------------------- queries
    def locate(self, tensor: object) -> tuple[int, str] | None:
        """(offload index, name) of an offloaded parameter or of one of its leaf tensors, by identity; None otherwise."""
        return self._param_locations.get(id(tensor))

    def piece_of(self, tensor: object) -> int:
        """The piece of its layer's block that holds an offloaded parameter or leaf."""
        return self._pieces_of[id(tensor)][1]

    def chunk_of(self, first: torch.Tensor, last: torch.Tensor) -> tuple[int, range]:
        """The offload index and the run of its block's pieces that an op's parameters span.

        The pass lists each op's parameters in piece order, so the first and the last
        one bound the run: two lookups, whatever the number of parameters.
        """
        offload_index, low = self._pieces_of[id(first)]
        other, high = self._pieces_of[id(last)]
        if other != offload_index or high < low:
            raise RuntimeError(
                f"a prefetch op was given parameters of offload indices {offload_index} and {other} (pieces {low} "
                f"and {high}); each op names one run of one block's pieces, in order: the graph was miscompiled"
            )
        return offload_index, range(low, high + 1)

    def stats(self) -> OffloadStats:
        layout = self.disk.layout if self.disk is not None else None
        return OffloadStats(
            total_layers=len(self.plan.layers),
            offloaded_layers=len(self.offloaded),
            offloaded_bytes=self.plan.offloaded_bytes(),
            host_pinned_bytes=self.host.nbytes if self.host.pinned else 0,
            slot_pool_bytes=self.slots.nbytes,
            kept_device_bytes=sum(leaf_bytes(t) for t in self.kept_tensors.values()),
            disk_layers=len(layout.layers) if layout else 0,
            disk_bytes=layout.nbytes if layout else 0,
            staging_bytes=layout.ring_bytes if layout else 0,
        )

    def record_compile(self, graph: str, waits: int, ops_inserted: int, seconds: float) -> CompileRecord:
        record = CompileRecord(graph, waits, ops_inserted, seconds)
        self.compiles.append(record)
        return record

    def compiling(self) -> None:
        """A graph reading this runtime's parameters is being compiled (the backend says so, cache hits too).

        The forward that compiles it (begun, or the next to begin) shows the compile
        in its copies' windows, so the first timed forwards are the ones after it.
        """
        first = self._first_forwards
        if first is not None and not first.closed:
            first.postpone(max(first.window.start, first.forwards_begun + 2))

    def check_placement(self, names: Sequence[str] | None = None) -> None:
        """Refuse offloaded parameters that no longer view their slot.

        ``model.to(dtype)``, ``.half()``, ``.cuda()`` and friends give a parameter new
        storage; it would then keep the values of whatever layer sat in the slot at
        that moment. Raised at the next forward, before any number is computed.
        """
        for name in self._placements if names is None else names:
            for layer, placement in self._placements[name]:
                param = get_inner(self.offloaded_params[name], placement.inner)
                if param.data_ptr() != self.slots.block(layer).data_ptr() + placement.offset or not placement.fits(param):
                    raise RuntimeError(
                        f"offloaded parameter {placement.name} no longer lives in its device slot (now "
                        f"{param.dtype}, {tuple(param.shape)} on {param.device}): an offloaded model cannot change "
                        "dtype or device (model.to, .half, .float, ...). Convert the model before offload(), "
                        "or load new values with runtime.load_weights / model.load_state_dict"
                    )

    def bind_model(self, model: torch.nn.Module) -> None:
        """Remember (weakly) the model whose parameters these are, for :meth:`check_not_replaced`."""
        self._model = weakref.ref(model)

    def check_not_replaced(self, names: Iterable[str] | None = None) -> None:
        """Refuse offloaded parameters that the model no longer holds (``quantize_``, a module swap, an assignment).

        Their replacement was computed from the parameter as it stood, a view of a
        slot that held whichever layer sat there: another layer's values. And the
        runtime would go on copying the old weights into the slot, which no one reads.
        """
        model = self._model() if self._model is not None else None
        if model is None:
            return
        for name in self._placements if names is None else names:
            # A walk of the modules' own dicts, not model.get_parameter (about 10 us a name): an eager block
            # call checks its parameters at every call.
            *path, attribute = name.split(".")
            owner: torch.nn.Module | None = model
            for part in path:
                owner = owner._modules.get(part)
                if owner is None:
                    break
            if owner is None or owner._parameters.get(attribute) is not self.offloaded_params[name]:
                raise RuntimeError(
                    f"offloaded parameter {name} was replaced on the model after offloading (quantize_, a module "
                    "swap, an assignment): its new value was made from a slot shared with other layers. Quantize "
                    "or convert the model before offload(), or load new values with runtime.load_weights / "
                    "model.load_state_dict"
                )

    # -------------------------------------------------------------- the ops
    def wait_op(self, first: torch.Tensor, last: torch.Tensor) -> None:
        """``wait_prefetch``'s body: the chunk that the op's first and last parameters bound is in its slot on return.

        It also refuses a first parameter that no longer views its slot, by one
        address compare: :meth:`check_placement` runs when a graph is compiled, but a
        conversion and its inverse (``model.to(torch.bfloat16).to(torch.float32)``)
        leave every guard as it was, and Dynamo would reuse the graph, whose
        parameters would hold whatever layer sat in their slot at the conversion.
        Tensors of no offloaded layer of this runtime (a copy of an offloaded
        parameter carries its runtime attribute) make it do nothing.
        """
        chunk = self._op_chunks.get((id(first), id(last))) or self._op_chunk(first, last)
        if chunk is None:
            return
        if first.data_ptr() != chunk.address:
            self.check_placement()
        self.wait(chunk.offload_index, chunk.pieces)

    def start_op(self, first: torch.Tensor, last: torch.Tensor) -> None:
        """``start_prefetch``'s body: start bringing the slot's next layer into the bytes the op's parameters free."""
        chunk = self._op_chunks.get((id(first), id(last))) or self._op_chunk(first, last)
        if chunk is not None:
            self.start(chunk.following, chunk.pieces)

    def _op_chunk(self, first: torch.Tensor, last: torch.Tensor) -> _OpChunk | None:
        """Resolve and keep what an op's parameters name; None for tensors that are not this runtime's.

        Dynamo passes a graph the same parameter objects at every call, so an
        op's pair resolves once: later calls take one lookup instead of a chain
        of them (each Python frame counts, between an Inductor graph's launches).
        """
        if id(first) not in self._pieces_of:
            return None
        offload_index, pieces = self.chunk_of(first, last)
        chunk = _OpChunk(offload_index, pieces, self.plan.next_in_slot(offload_index), self._addresses[id(first)])
        self._op_chunks[(id(first), id(last))] = chunk
        return chunk

    def start(self, offload_index: int, pieces: range | None = None) -> None:
        """Begin copying a layer's pieces (all by default) into its slot, after all work queued on the compute stream."""
        pieces = self._all_pieces if pieces is None else pieces
        if self._trace is not None:
            self._trace.append(("start", offload_index, pieces))
        layer = self.offloaded[offload_index]
        missing = self._missing(layer, pieces)
        if not missing:
            return
        if self._blocks_running and self._evicts_running_block(layer, missing):
            self._held_starts.append((offload_index, pieces))  # issued when the running block returns
            return
        key = (offload_index, pieces.start, pieces.stop)
        if self._capture is not None and key in self._capture.deferred:
            self._mark_freed(key)
            return
        self._copy_in(layer, missing)

    def _queue_behind_deferred(self) -> None:
        """Inside a capture, at a segment's first copy: order the graph's copies after the deferred ones.

        The copies issued after the last replay (the wrap-around prefetches) and
        this segment's first copy would otherwise share the link, as copies on
        one stream never do: the graph waits for the last of them (they run in
        order on the copy stream) through its external event.
        """
        assert self._capture is not None
        if self._capture.behind_deferred:
            return
        self._capture.behind_deferred = True
        if self._capture.deferred:
            index, _, stop = self._capture.deferred[-1]
            self.copy_stream.wait_event(self._ready[index][stop - 1])

    def _mark_freed(self, key: ChunkKey) -> None:
        """Inside a capture: record where a deferred start stood, for the copy issued after each replay.

        That copy is issued eagerly after the replay, so that the next forward's copy
        overlaps the host's work, and it waits for this point of the graph (an
        external event recorded here), not for the graph's end, so that it also
        overlaps whatever the graph computes after it. The event is recorded on the
        copy stream once that stream has caught up with the compute stream here:
        the copy then queues behind the copies the graph made before this point,
        as it would have in the graph's own copy stream. Recorded on the compute
        stream alone, it let the deferred copy share the link with the graph's
        earlier copies still in flight, which copies on one stream never do.
        """
        compute = torch.cuda.current_stream(self.device)
        reached = torch.cuda.Event()
        reached.record(compute)
        self.copy_stream.wait_event(reached)  # also what pulls the copy stream into the capture
        index, first, _ = key
        self._freed[index][first].record(self.copy_stream)
        tail = torch.cuda.Event()  # the capture must end joined with everything on the copy stream
        tail.record(self.copy_stream)
        assert self._capture is not None
        self._capture.tails.append(tail)
        self._capture.freed.add(key)

    def wait(self, offload_index: int, pieces: range | None = None) -> None:
        """Make the compute stream wait until the layer's pieces (all by default) are resident in its slot."""
        pieces = self._all_pieces if pieces is None else pieces
        if self._trace is not None:
            self._trace.append(("wait", offload_index, pieces))
        layer = self.offloaded[offload_index]
        missing = self._missing(layer, pieces)
        if missing:
            self._count_miss(layer)
            self._copy_in(layer, missing)
        if self.recorder is None:
            self._wait_for_copy(offload_index, pieces)
            return
        compute = self._current_stream() if self._cuda else None
        self.recorder.wait_began(offload_index, pieces, compute, bool(missing))
        self._wait_for_copy(offload_index, pieces)
        self.recorder.wait_ended(offload_index, compute)

    def begin_block(self, offload_index: int) -> None:
        """An offloaded block's eager call has loaded it and starts running (the block hooks call this)."""
        self._blocks_running.append(offload_index)

    def end_block(self, offload_index: int) -> None:
        """The block's eager call is over (or never began: its pre-hook raised): issue the starts it held back.

        They are issued in the order the graphs asked for them, so chunked copies stay
        chunk by chunk (later than the graph placed them, but never over bytes the
        block still reads); its hook then prefetches whatever is still missing.
        """
        if offload_index in self._blocks_running:
            self._blocks_running.remove(offload_index)
        held, self._held_starts = self._held_starts, []
        for index, pieces in held:
            self.start(index, pieces)  # held again if it would evict another block still running

    def _evicts_running_block(self, layer: LayerPlan, pieces: list[int]) -> bool:
        """Whether copying ``pieces`` of ``layer`` would overwrite a block whose eager call is still running.

        A graph break inside a block (an MoE layer's ``nonzero`` routing) makes Dynamo
        run the block eagerly and compile its parts: a graph of the attention, then
        eager code and graphs of the experts. The first graph's ``start_prefetch``
        follows the last read *in that graph*, and would bring the slot's next layer
        in over the experts that the eager code has yet to read, which no
        ``wait_prefetch`` guards. Such a start is held and issued when the block
        returns (:meth:`end_block`).
        """
        owners = self._owners[layer.slot]
        return any(owners[piece] in self._blocks_running for piece in pieces)

    def _missing(self, layer: LayerPlan, pieces: range) -> list[int]:
        """The pieces whose bytes in the layer's slot are (or are being filled with) another layer's."""
        owners = self._owners[layer.slot]
        index = layer.offload_index
        if owners[pieces.start : pieces.stop].count(index) == len(pieces):  # the usual case, without a Python loop
            return []
        return [piece for piece in pieces if owners[piece] != index]

    def _wait_for_copy(self, offload_index: int, pieces: range) -> None:
        if not self._in_flight:
            return  # always so on the CPU, where copies are synchronous
        waited = compute = None
        for piece in pieces:
            copy = self._in_flight.pop((offload_index, piece), None)
            if copy is None:
                continue
            if self._capture is not None and not copy.in_capture:
                self._capture.consumed.add((offload_index, piece))
            if copy.done is not waited:  # the pieces of one copy made inside a capture share its event
                if compute is None:
                    compute = self._current_stream()
                self._cu.wait(copy.done, compute)
                waited = copy.done

    def _copy_in(self, layer: LayerPlan, pieces: list[int], after: torch.cuda.Event | None = None) -> None:
        """Copy ``pieces`` (increasing) of ``layer`` into its slot: one ``copy_`` per run of adjacent pieces.

        A disk-resident layer comes from its staging buffer, whole: a plan with a disk tier
        is never chunked (``load_checkpoint`` sees to it), so its one piece is the layer.
        """
        # Before the owners change: a failed disk read leaves the slot as it was.
        staged = self._staged(layer) if self.disk is not None else None
        index = layer.offload_index
        owners = self._owners[layer.slot]
        for piece in pieces:
            owners[piece] = index
        copies = self._host_copies(layer, pieces) if staged is None else self._staged_copies(layer, staged)
        if self._capture is not None:
            self._capture.copies += copies.count
            self._capture.copied_bytes += copies.nbytes
            self._capture.memcpys += [(index, nbytes) for nbytes in copies.memcpy_bytes]
        else:
            self.counters.copies += copies.count
            self.counters.copied_bytes += copies.nbytes
        recorder = self.recorder
        if not self._cuda:
            if recorder is not None:
                recorder.copy_issued(index, pieces, copies.memcpy_bytes, None)
                recorder.copy_began(None)
            try:
                for source, target in copies.pairs:
                    target.copy_(source)
            finally:
                if staged is not None:
                    staged.release(None)  # synchronous copies: done
            if recorder is not None:
                recorder.copy_ended(None)
            return
        # From here on the torch.cuda wrappers are bypassed (self._cu): see _torch_internals.CudaCalls.
        cu = self._cu
        compute = self._current_stream()
        capturing = cu.is_capturing()
        # The fork event orders the copy after the last reader of the same bytes of the slot's
        # previous layer, and inside a capture it is what pulls the copy stream into the graph.
        fork = after
        if fork is None:
            fork = torch.cuda.Event() if capturing else self._fork
            cu.record(fork, compute)
        if recorder is not None:
            recorder.copy_issued(index, pieces, copies.memcpy_bytes, compute)
        copy_stream = self.copy_stream
        cu.wait(fork, copy_stream)
        if capturing:
            self._queue_behind_deferred()
        if recorder is not None:
            recorder.copy_began(copy_stream)
        # One driver call per memcpy, by address, on the copy stream (see cuda_driver); the driver acts in the
        # current device's context, so the runtime's device is made current for it if another one is.
        current_device = cu.current_device()
        if current_device != self._device_index:
            cu.set_device(self._device_index)
        try:
            h2d, stream = self._h2d.copy, self._copy_handle
            for target, source, nbytes in copies.memcpys:
                status = h2d(target, source, nbytes, stream)
                if status:
                    raise self._h2d.error(status, nbytes, layer.name)
        finally:
            if current_device != self._device_index:
                cu.set_device(current_device)
            if staged is not None:
                copied = torch.cuda.Event()  # the staging buffer's own: _ready is re-recorded by later copies
                copied.record(copy_stream)
                staged.release(copied)
        if recorder is not None:
            recorder.copy_ended(copy_stream)
        if capturing:
            done = torch.cuda.Event()
            cu.record(done, copy_stream)
            copy = _InFlight(done, True)
            for piece in pieces:
                self._in_flight[(index, piece)] = copy
        else:
            flights = self._flights[index]
            for piece in pieces:
                flight = flights[piece]
                cu.record(flight.done, copy_stream)
                self._in_flight[(index, piece)] = flight

    def _host_copies(self, layer: LayerPlan, pieces: list[int]) -> _Copies:
        """The copies that bring ``pieces`` of a host-resident layer in: one per run of adjacent pieces.

        Made once per (layer, pieces) and kept, since the arena and the slots never
        move: slicing the two buffers at every copy was most of a start's host time
        (7.5 of 8 us on the development machine's CPU, the memcpy of a small layer 0.6).
        """
        key = (layer.offload_index, tuple(pieces))
        copies = self._copies.get(key)
        if copies is None:
            host, slot = self.host.block(layer), self.slots.block(layer)
            runs = _byte_runs(self._pieces[layer.offload_index], pieces)
            pairs = tuple((host[begin:end], slot[begin:end]) for begin, end in runs)
            copies = self._copies[key] = _Copies(pairs, len(runs), sum(end - begin for begin, end in runs))
        return copies

    def _staged_copies(self, layer: LayerPlan, staged: StagedLayer) -> _Copies:
        """A disk-resident layer from its staging buffer: one copy of the layer, one memcpy per tensor."""
        slot = self.slots.block(layer)
        pairs = tuple((source, slot[offset : offset + source.numel()]) for source, offset in staged.pieces)
        return _Copies(pairs, 1, layer.nbytes)

    def _staged(self, layer: LayerPlan) -> StagedLayer | None:
        """A disk-resident layer read into a staging buffer (blocks until it is); None for the host arena's.

        Called only with a disk tier (``_copy_in`` looks first).
        """
        if not self.disk.holds(layer.offload_index):
            return None
        if self._cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"{layer.name} is read from disk, which a CUDA graph cannot replay; the backend refuses "
                "cuda_graphs=True for a model with a disk tier"
            )
        return self.disk.take(layer.offload_index)

    def _count_miss(self, layer: LayerPlan) -> None:
        counters = self.counters
        counters.ensure_misses += 1
        graph = self.current_graph
        counters.misses_by_graph[graph] = counters.misses_by_graph.get(graph, 0) + 1
        if counters.misses_by_graph[graph] == 1:
            log.warning(
                "prefetch_compile: %s was not resident when %s read it; copied on the spot. A graph break "
                "inside a block, an eager call of an offloaded block, a forward that raised or a refused in-place "
                "edit does this, and so do uncompiled forwards from several threads (locked per block, so they "
                "interleave) and a forward that reads its offloaded layers in another order than the plan's "
                "(counted in runtime.counters.ensure_misses, warned once per graph)",
                layer.name,
                graph,
            )

    # ------------------------------------------------------------ the report
    def start_recording(self) -> CopyRecorder:
        """Record every copy and wait from now on, for :meth:`report` (a few microseconds per copy)."""
        from .report import CopyRecorder

        self._first_forwards = None
        self.recorder = self._recording = CopyRecorder(self.offloaded, self.device)
        return self.recorder

    def stop_recording(self) -> None:
        """Record nothing more, the first timed forwards included; :meth:`report` keeps what was recorded until now."""
        self.recorder = self._first_forwards = None

    def report(self) -> CopyReport:
        """Per offloaded layer: bytes, copy time, the window that hid it, the stall; and totals.

        Covers the forwards since :meth:`start_recording` (up to :meth:`stop_recording`,
        if called since), or without it the first timed forwards
        (``report.FIRST_TIMED_FORWARDS`` of them, after the last graph compiled) once
        the forward after them has begun; ``print(report.render())`` shows it.
        """
        if self._recording is not None:
            return self._recording.report()
        if self._first_forwards is not None and self._first_forwards.closed:
            self._log_first_forwards(wait=True)
        if self.first_report is None:
            raise RuntimeError(
                "nothing recorded: call runtime.start_recording() before the forwards to report on (without it, "
                "report() covers the first timed forwards once the one after them has begun; CUDA graph replays "
                "record nothing)"
            )
        return self.first_report

    def _log_first_forwards(self, wait: bool = False) -> None:
        """Log the first timed forwards' totals, once the device has reached their marks (or ``wait``: now).

        Without it a user learns whether the copies hide only by asking for
        :meth:`report`. Looked at each time the runtime is entered or left from
        outside, once the forward following them has begun; a look queries events
        and never synchronises the device.
        """
        recorder = self._first_forwards
        assert recorder is not None
        if recorder.abandoned:
            log.debug("prefetch_compile: no first-forwards report: the forwards could not be told apart")
            self.stop_recording()
            return
        if not wait and not recorder.complete():
            return
        self.first_report = recorder.report()
        self._first_forwards = None
        if self.recorder is recorder:
            self.recorder = None
        log.info(
            "prefetch_compile: forwards %d-%d of '%s': %s (runtime.report() shows each offloaded layer)",
            recorder.window.start,
            recorder.window.stop - 1,
            self.plan.layer_list_path,
            self.first_report.totals(),
        )

    # ------------------------------------------------------- stream discipline
    def _current_stream(self) -> torch.cuda.Stream:
        """The device's current stream (the compute stream of whatever calls in), found cheaply.

        Usually it is the stream the last entry (:meth:`acquire`) found, which a
        compare of raw handles confirms without making a ``Stream`` object. Code
        that switched streams since (a stream context inside the model, a capture)
        gets the stream it switched to, as from ``torch.cuda.current_stream``.
        """
        if self._cu.current_stream_handle(self.device.index) == self._compute_handle:
            return self._compute_stream
        return torch.cuda.current_stream(self.device)

    @contextmanager
    def serving(self, graph: str) -> Iterator[None]:
        """Hold the runtime while one compiled graph or CUDA graph replay runs (see :meth:`acquire`)."""
        try:
            self.acquire(graph)
            yield
        finally:
            self.release()

    def acquire(self, graph: str) -> None:
        """Take the lock for ``graph`` (a name for warnings), and order the compute stream after the last one used.

        The stream order makes a caller on another stream safe: its copies never
        overwrite a slot that work queued on the previous stream still reads.
        Entering from outside (not from a graph already held) settles the
        in-place edits made since the last entry (:meth:`settle_edits`); when
        that raises, the lock is held all the same and the caller releases it.
        """
        self.lock.acquire()
        self._graphs.append(graph)
        if self._cuda and not self._cu.is_capturing():  # the C call: acquire runs at every graph call
            handle = self._cu.current_stream_handle(self.device.index)
            if handle != self._compute_handle:  # another stream than the last entry's (or the first entry)
                stream = torch.cuda.current_stream(self.device)
                if self._compute_stream is not None:
                    stream.wait_stream(self._compute_stream)
                self._compute_stream, self._compute_handle = stream, handle
        if len(self._graphs) == 1:
            self._look_at_first_forwards()
            self.settle_edits()
            self.disk_copies.let_go()
            self.host_values.let_go()

    def release(self) -> None:
        if len(self._graphs) == 1:
            self._look_at_first_forwards()
        self._graphs.pop()
        self.lock.release()

    def _look_at_first_forwards(self) -> None:
        if self._first_forwards is not None and self._first_forwards.closed:
            self._log_first_forwards()

    @property
    def current_graph(self) -> str:
        """The graph (or eager block) whose ops run now, named in the ensure warning."""
        return self._graphs[-1] if self._graphs else "eager code"

    def join_capture(self) -> None:
        """Before a capture ends, fold every copy it started back into the capturing stream."""
        if not self._cuda or not self._cu.is_capturing():  # the C call, as in acquire
            return
        compute = torch.cuda.current_stream(self.device)
        if self._capture is not None:
            for tail in self._capture.tails:
                compute.wait_event(tail)
            self._capture.tails.clear()
            self._capture.behind_deferred = False  # the next segment is a graph of its own
        joined: set[int] = set()
        for key, copy in list(self._in_flight.items()):
            if copy.in_capture:
                if id(copy.done) not in joined:
                    compute.wait_event(copy.done)
                    joined.add(id(copy.done))
                del self._in_flight[key]

    def synchronize_copies(self) -> None:
        """Order all issued copies before later compute-stream work (before a weight update, say)."""
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            self._in_flight.clear()

    # ------------------------------------------------------ CUDA graph support
    @contextmanager
    def tracing_ops(self) -> Iterator[list[tuple[str, int, range]]]:
        """Record the ``("start"|"wait", offload index, pieces)`` calls made inside the block (a warm-up call)."""
        self._trace = trace = []
        try:
            yield trace
        finally:
            self._trace = None

    def snapshot(self) -> SlotState:
        return SlotState(tuple(tuple(owners) for owners in self._owners), dict(self._in_flight))

    def begin_capture(self, deferred: tuple[ChunkKey, ...]) -> None:
        if self._first_forwards is not None and not self._first_forwards.closed:
            self.stop_recording()  # replays copy and wait without the runtime: no forward would be recorded again
        self._capture = CaptureLog(deferred)

    def end_capture(self, before: SlotState) -> tuple[SlotState, CaptureLog]:
        """Close a capture: return the state it ends in, and put back the state it began from.

        Nothing captured has run yet, so the slots still hold what they held before
        the capture; Python must say so too until the graph is replayed.
        """
        log_, self._capture = self._capture, None
        after = self.snapshot()
        self._owners = [list(owners) for owners in before.owners]
        self._in_flight = dict(before.in_flight)
        assert log_ is not None
        return after, log_

    def restore_slots(self, owners: Sequence[Sequence[int | None]]) -> None:
        """Before a replay: give every piece of every slot the layer the graph was captured with.

        Python code run since the capture (an eager block call, a forward that
        raised, another graph) may have left other layers there; the replay would
        read them blindly. The restoring copies run on the compute stream, ahead
        of the replay, after any copy still in flight.
        """
        stale = [
            (slot, piece, wanted)
            for slot, slot_owners in enumerate(owners)
            for piece, wanted in enumerate(slot_owners)
            if wanted is not None and self._owners[slot][piece] != wanted
        ]
        if not stale:
            return
        self.synchronize_copies()
        for slot, piece, wanted in stale:
            self._copy_piece_on_compute(self.offloaded[wanted], piece)
            self.counters.restores += 1

    def _copy_piece_on_compute(self, layer: LayerPlan, piece: int) -> None:
        """Copy one piece of a host-resident layer into its slot on the compute stream (copies synchronised first).

        On the compute stream, a copy is ordered before whatever runs next there, a
        CUDA graph replay included, which waits on no Python-side record of copies.
        """
        copies = self._host_copies(layer, [piece])
        for source, target in copies.pairs:
            target.copy_(source, non_blocking=self._cuda)
        self._owners[layer.slot][piece] = layer.offload_index
        self.counters.copies += copies.count
        self.counters.copied_bytes += copies.nbytes
        if self.recorder is not None:
            self.recorder.untimed_copies([(layer.offload_index, copies.nbytes)])

    def after_replay(self, end: SlotState, log_: CaptureLog) -> None:
        """After a replay: Python learns what the graph did, then issues the deferred prefetches."""
        self._owners = [list(owners) for owners in end.owners]
        self.counters.copies += log_.copies
        self.counters.copied_bytes += log_.copied_bytes
        if self.recorder is not None:
            self.recorder.untimed_copies(log_.memcpys)
        for key in log_.consumed:
            self._in_flight.pop(key, None)
        for key in log_.deferred:
            index, first, stop = key
            layer = self.offloaded[index]
            owners = self._owners[layer.slot]
            missing = [piece for piece in range(first, stop) if owners[piece] != index]
            if missing:
                self._copy_in(layer, missing, after=self._freed[index][first] if key in log_.freed else None)

    # ----------------------------------------------------------- weights
    def settle_edits(self, names: Iterable[str] | None = None, superseded: bool = False) -> None:
        """Keep or undo the in-place edits of offloaded parameters (``names`` only, if given) since the last look.

        Owners change only while the runtime is held, and every entry looks first,
        so the owner of an edited leaf's bytes now is the one the edit wrote over
        (see edits.py). The edit is kept, copied to the host arena, when that is
        the leaf's own layer with no copy into those bytes in flight (a copy
        stream write racing the edit), and no other layer's leaf that shares
        those bytes of the slot was edited too (the bytes then hold whichever
        edit came last, and keeping them could give the layer the other's
        values). Otherwise the bytes are marked as holding
        no layer, so that the next read copies its layer in again, and
        :class:`~prefetch_compile.edits.InPlaceEditError` names each edit,
        unless ``superseded``: new values for these parameters are being loaded.
        """
        lost = self.disk_copies.written()
        if lost:
            raise InPlaceEditError(
                f"written into the state_dict() value of disk-resident parameter(s) {', '.join(lost)}: that value is "
                "a copy read from the checkpoint file, which the disk tier never writes, so the write changed "
                "nothing and the model keeps its weights. Disk-resident weights change only by writing the "
                "checkpoint and loading it again"
            )
        # Both looks run: each counts what it saw as seen.
        host_written = bool(self.host_values.written()) | (self.host.buffer._version != self._host_version)
        changed = self.edits.changed(names)
        if not changed:
            if host_written:
                self._refresh_from_host()
            return
        self.check_placement(sorted({placement.param_name for _, placement in changed}))  # p.set_(...) moves it
        # Every edit is judged against the owners as they were, before any refusal marks a piece empty.
        judged = [(layer, placement, self._refusal_reason(layer, placement)) for layer, placement in changed]
        refused: list[tuple[str, str]] = []
        on_disk: list[str] = []
        for layer, placement, why in judged:
            if why is None:
                # The slot holds this leaf's own layer; but if an edit of another layer's leaf wrote these
                # bytes too, they hold whichever edit came last, which nothing tells: neither is kept.
                why = self._shared_bytes_edited(layer, placement, judged)
            if why is None:
                param_view(self.host.block(layer), placement).copy_(param_view(self.slots.block(layer), placement))
                continue
            if self.disk is not None and self.disk.holds(layer.offload_index):
                on_disk.append(placement.name)
            self._owners[layer.slot][self.plan.piece_of(placement)] = None
            refused.append((placement.name, why))
        if host_written:
            self._refresh_from_host()  # after the kept edits reached the host copies, so they survive the refresh
        else:
            self._host_version = self.host.buffer._version  # the kept edits' own writes
        if refused and not superseded:
            raise refusal(refused, on_disk)

    def _refusal_reason(self, layer: LayerPlan, placement: ParamPlacement) -> str | None:
        """Why an edit of ``placement``'s leaf cannot be kept, from the slot's owners alone; None if it can."""
        piece = self.plan.piece_of(placement)
        index = layer.offload_index
        holder = self._owners[layer.slot][piece]
        if self.disk is not None and self.disk.holds(index):
            return "its layer is read from the checkpoint files at every forward, which are never written"
        if holder is None:
            return "its slot held no layer's bytes there"
        if holder != index:
            return f"its slot held {self.offloaded[holder].name}, whose bytes it changed instead"
        if (index, piece) in self._in_flight:
            return "its layer was being copied into the slot (a prefetch in flight), which the edit raced"
        return None

    @staticmethod
    def _shared_bytes_edited(
        layer: LayerPlan, placement: ParamPlacement, judged: Sequence[tuple[LayerPlan, ParamPlacement, str | None]]
    ) -> str | None:
        """Why an edit the owners allow is refused all the same: another layer's edit wrote the same slot bytes."""
        end = placement.offset + placement.nbytes
        for other_layer, other, _ in judged:
            if (
                other_layer.slot == layer.slot
                and other_layer.offload_index != layer.offload_index
                and other.offset < end
                and placement.offset < other.offset + other.nbytes
            ):
                return (
                    f"{other.name}, which shares these bytes of the slot, was edited too, so they held whichever "
                    "edit came last"
                )
        return None

    def _refresh_from_host(self) -> None:
        """The host arena was written from outside the runtime: copy every host-resident layer in a slot again.

        ``state_dict()`` and :meth:`host_value` return the host copies' own bytes, as
        plain PyTorch's ``state_dict()`` returns views of the parameters, so
        ``model.state_dict()[name].copy_(value)`` writes the host copy. A layer whose
        slot already held it (a slot's first layer between forwards, or a layer alone
        in its slot for good) would otherwise keep the old bytes until its next copy,
        or forever. Such writes are seen as a whole (the arena's version counter, the
        handed-out values' watch), not by layer: every host-resident piece in a slot
        is copied again, once per look that saw writes, on the compute stream, so that
        a CUDA graph replay, which reads its slots without waiting for Python's copies,
        is ordered after them.
        """
        self._host_version = self.host.buffer._version
        resident = [
            (owner, piece)
            for slot_owners in self._owners
            for piece, owner in enumerate(slot_owners)
            if owner is not None and not (self.disk is not None and self.disk.holds(owner))
        ]
        if not resident:
            return
        self.synchronize_copies()
        for owner, piece in resident:
            self._copy_piece_on_compute(self.offloaded[owner], piece)

    def load_weights(self, new_values: Mapping[str, torch.Tensor]) -> None:
        """Overwrite parameters in place, offloaded or kept; later eager calls and graph replays see them.

        Every name, shape and dtype is checked before anything is written, so a
        bad update leaves the model as it was. A tied tensor may come under any of
        its names (``lm_head.weight`` for a tied embedding, as ``state_dict()``
        lists it), once or under several with equal values.
        """
        new_values = self._by_kept_name(new_values)
        for name, value in new_values.items():
            current = self.offloaded_params.get(name, self.kept_tensors.get(name))
            if current is None:
                raise KeyError(f"load_weights: {name!r} is not a parameter or buffer of the offloaded model")
            self.refuse_disk_write(name, "load_weights")
            if tuple(value.shape) != tuple(current.shape) or value.dtype != current.dtype:
                raise ValueError(
                    f"load_weights: {name!r} expects shape {tuple(current.shape)} and dtype {current.dtype}, "
                    f"got {tuple(value.shape)} and {value.dtype}"
                )
            for _, placement in self._placements.get(name, ()):  # a subclass's leaves: the bytes that are copied
                try:
                    leaf = get_inner(value, placement.inner)
                except AttributeError:
                    leaf = None
                if not isinstance(leaf, torch.Tensor) or not placement.fits(leaf):
                    raise ValueError(
                        f"load_weights: {name!r} is a {type(current).__name__} whose leaf {placement.name} is "
                        f"{placement.dtype} {placement.shape}; the new {type(value).__name__} has "
                        + ("no such leaf" if leaf is None else f"{leaf.dtype} {tuple(leaf.shape)} there")
                    )
        with self.lock:
            self.settle_edits(new_values, superseded=True)
            self.synchronize_copies()
            for name, value in new_values.items():
                if name not in self._placements:
                    self.kept_tensors[name].data.copy_(value)
                    continue
                for layer, placement in self._placements[name]:
                    leaf = get_inner(value, placement.inner)
                    param_view(self.host.block(layer), placement).copy_(leaf)
                    if self._owners[layer.slot][self.plan.piece_of(placement)] == layer.offload_index:
                        # The slot already holds this layer: refresh it in place so the next read sees the update.
                        param_view(self.slots.block(layer), placement).copy_(leaf)
            self._host_version = self.host.buffer._version  # its own writes

    def _by_kept_name(self, new_values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``new_values`` keyed by the names the runtime keeps its tensors under, tied aliases resolved.

        The runtime knows each tensor by one name, the first of ``named_parameters()``;
        the model's other names for it come from the model itself. Two different values
        for one tied tensor cannot both be loaded: refused, naming both.
        """
        aliases = self._tied_aliases()
        resolved: dict[str, tuple[str, torch.Tensor]] = {}
        for name, value in new_values.items():
            kept_name = aliases.get(name, name)
            if kept_name in resolved:
                other, first = resolved[kept_name]
                if value is not first and not torch.equal(value, first):
                    raise ValueError(
                        f"load_weights: {other!r} and {name!r} are one tied tensor and were given different values; "
                        "nothing was written"
                    )
                continue
            resolved[kept_name] = (name, value)
        return {kept_name: value for kept_name, (_, value) in resolved.items()}

    def _tied_aliases(self) -> dict[str, str]:
        """The model's other names for the tensors the runtime keeps, once: a load_state_dict asks once per module."""
        if self._aliases is None:
            model = self._model() if self._model is not None else None
            if model is None:
                return {}
            kept = [*self.offloaded_params.items(), *self.kept_tensors.items()]
            known = {id(tensor): name for name, tensor in kept}
            every = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
            self._aliases = {name: known[id(tensor)] for name, tensor in every if known.get(id(tensor), name) != name}
        return self._aliases

    def refuse_disk_write(self, name: str, caller: str) -> None:
        """Raise if ``name`` is a disk-resident parameter: its value lives in the checkpoint files, read-only."""
        if self.disk is not None and name in self.disk.layout.sources:
            raise ValueError(
                f"{caller}: {name} is read from the checkpoint files at every forward (the disk tier of "
                f"load_checkpoint(host_budget=...)), which are never written; nothing was written. Load the model "
                "with a host_budget that keeps its layer in host memory, or save a new checkpoint and load that"
            )

    def host_value(self, name: str) -> torch.Tensor:
        """The true value of a dense offloaded parameter (the slot may hold another layer).

        That is its view in the host arena, or, for a disk-resident parameter, a
        fresh CPU tensor read from the checkpoint file. A tensor-subclass
        parameter has several leaves and no single host view: refused.
        """
        if name not in self._placements:
            raise KeyError(
                f"host_value: {name!r} is not an offloaded parameter of this runtime (it stays on the device: read "
                "it from the model); the offloaded ones are runtime.offloaded_params"
            )
        with self.lock:
            # A converted model (model.half()) would give the host copy's old dtype beside the kept
            # parameters' new one: refused here as at the next forward.
            self.check_placement([name])
            self.settle_edits([name])
        ((layer, placement), *others) = self._placements[name]
        if placement.inner or others:
            raise RuntimeError(
                f"the host value (state_dict, host_value) of offloaded tensor-subclass parameter {name} is not "
                "supported: its leaves live in the host arena separately; save the model before offloading"
            )
        # Made under inference_mode, the value would be an inference tensor (the arena's bytes on a storage of
        # their own, or a fresh tensor read from disk), which has no version counter: a write into it would go
        # unseen.
        with torch.inference_mode(False):
            if self.disk is not None and self.disk.holds(layer.offload_index):
                value = self.disk.read_tensor(name)
                self.disk_copies.add(name, value)
                return value
            # On a storage of its own that aliases the arena, as each parameter of a model that is not
            # offloaded has its own: safetensors' save_model and load_model refuse tensors that do not fill
            # their storage. It has its own version counter too, hence the watch.
            value = aliased_param_view(self.host.block(layer), placement)
            self.host_values.add(name, value)
            return value


def _byte_runs(pieces: tuple[tuple[int, int], ...], chosen: list[int]) -> list[tuple[int, int]]:
    """The byte ranges of the ``chosen`` pieces (increasing), adjacent ones merged: one copy per range."""
    runs: list[tuple[int, int]] = []
    for piece in chosen:
        begin, end = pieces[piece]
        if runs and runs[-1][1] == begin:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((begin, end))
    return runs


def runtime_of_tensor(tensor: object) -> PrefetchRuntime | None:
    """The runtime that owns ``tensor`` as an offloaded parameter (or leaf of one), if any.

    The runtime is found through an attribute on the tensor itself, set by
    :meth:`PrefetchRuntime.__init__`: the custom ops run inside compiled code and
    receive nothing but tensors, and a process-wide table of runtimes would be
    state that outlives its models.
    """
    runtime = getattr(tensor, OWNER_ATTRIBUTE, None)
    if runtime is None or runtime.locate(tensor) is None:
        return None  # a copy of an offloaded parameter (deepcopy, pickle) is not offloaded
    return runtime


OWNER_ATTRIBUTE = "_prefetch_compile_runtime"


def describe(stats: OffloadStats, plan: OffloadPlan) -> str:
    """The one log line of an offload."""
    where = f"{format_bytes(stats.offloaded_bytes)} to host"
    if stats.disk_layers:
        where = (
            f"{format_bytes(stats.offloaded_bytes)} off the device: {format_bytes(stats.offloaded_bytes - stats.disk_bytes)} in host memory, "
            f"{stats.disk_layers} layers ({format_bytes(stats.disk_bytes)}) read from disk at every forward through a "
            f"{format_bytes(stats.staging_bytes)} staging ring"
        )
    return (
        f"prefetch_compile: offloaded {stats.offloaded_layers}/{stats.total_layers} layers of "
        f"'{plan.layer_list_path}' ({_pattern(plan)}), {where}, slot pool {plan.num_slots} slot(s) = "
        f"{format_bytes(stats.slot_pool_bytes)}, device bytes saved {format_bytes(stats.device_bytes_saved)}"
        + (f", copies chunked at {len(plan.piece_starts)} pieces per layer" if len(plan.piece_starts) > 1 else "")
    )


def _pattern(plan: OffloadPlan) -> str:
    if plan.options.offload_layers is not None:
        return f"offload_layers={list(plan.options.offload_layers)}"
    return f"group_size={plan.options.group_size}, num_in_group={plan.options.num_in_group}"


def format_bytes(nbytes: int) -> str:
    """Bytes in the largest binary unit that keeps the number at or above 1."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB"):
        if abs(value) < 1024:
            return f"{value:.0f} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"
