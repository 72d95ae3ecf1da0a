"""The disk tier at run time: a reader thread streams disk-resident layers through a ring of pinned staging buffers.

:mod:`prefetch_compile.disk_layout` decides which offloaded layers stay on disk
and how each is read; this module moves their bytes. The runtime asks for a
layer with :meth:`DiskTier.take` where it would read the layer's host block,
copies the pieces it gets to the slot, and hands the staging buffer back with
:meth:`StagedLayer.release`. The ordering guarantees are those of
``PrefetchRuntime.start`` / ``wait`` for the host arena, plus two of the ring's:

1. A layer's host-to-device copy is issued only once its staging buffer is
   filled: ``take`` blocks the host thread until the reader thread has read
   the layer. Like every copy, it is also ordered after the last reader of the
   slot's previous layer, by the fork event the runtime records on the compute
   stream at start time.
2. A staging buffer is refilled only once the copy that reads it has finished:
   ``release`` gets an event recorded on the copy stream after the copy, and
   the reader thread synchronises on it before its next read into the buffer.
3. ``wait`` is unchanged: the compute stream waits for the event recorded after
   the layer's last piece, so it returns only once the slot holds the layer.

Read-ahead. The runtime brings offloaded layers in in cyclic offload order
(layer *i* starts the next layer of its slot; the last ones wrap around to the
first), so the reader reads the disk-resident layers in that order, as far
ahead as the ring has free buffers: while the GPU computes and the copy stream
copies host-resident layers, the disk reads the next disk-resident ones. A
layer alone in its slot is copied once, when the model is placed, and stays:
it is in the first pass over the layers only.
A request that is not the next one (an ensure-path miss, an eager call of a
single block, a forward that raised) restarts the ring at the requested layer:
the layers read ahead are dropped (``discarded``), never handed out in place of
another. A failed read (an I/O error, a checkpoint file changed since loading)
raises from ``take`` on the host thread, naming the file; the slot keeps its
previous layer and owner, and the next request reads again.

On the CPU the same reader thread and ring run; copies are synchronous there,
so the buffer is released after its copy has returned, and a consumer that did
not wait for a fill would copy stale bytes: ordering mistakes show as wrong
numbers in CPU tests.

Host memory: the ring's ``layout.staging_buffers`` buffers of
``layout.staging_bytes``, page-locked on a CUDA device for the runtime's
lifetime. ``O_DIRECT`` reads leave nothing in the page cache (see
:mod:`prefetch_compile.direct_io`).

Where the time goes: :meth:`DiskTier.stream_stats` says how the reader thread
spent its time (reading, waiting for a buffer's copy to finish, idle with
nothing queued) and how long the consumer blocked in ``take``, so that a
stream slower than the disk can be told apart from a disk that was slower: a
reader busy all the time at a low rate is the disk; one that idles or waits is
the ring. Each is a ``time.perf_counter`` pair around a wait that is there anyway.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import weakref
from collections import deque
from dataclasses import astuple, dataclass, replace
from typing import Iterator, Protocol

import torch

from .checkpoint import CheckpointError
from .direct_io import DirectReader
from .disk_layout import DiskLayer, DiskLayout
from .memory import lazy_host_buffer, register_pinned, unregister_pinned
from .plan import OffloadPlan

log = logging.getLogger("prefetch_compile")


class CopyDone(Protocol):
    """What a staging buffer's next fill waits for: a CUDA event recorded after the copy that reads it."""

    def synchronize(self) -> None: ...


@dataclass
class _Fill:
    """One read of a layer into a staging buffer, in the ring's queue."""

    offload_index: int
    buffer: int
    state: str = "queued"  # queued -> reading -> filled
    error: BaseException | None = None


@dataclass(frozen=True)
class StreamStats:
    """What the disk tier's stream did since it was built: the reader thread's time, and the consumer's.

    Cumulative: ``later - earlier`` of two snapshots is what happened in
    between. The reader thread's times run up to the snapshot (the state it is
    in counts so far), so over a window ``read_s + copy_wait_s + idle_s`` is
    the window's wall time less a few microseconds of bookkeeping per read,
    and ``read_s`` over the wall time is how busy the disk was kept. Counts
    and bytes come when a read completes, so a window's ``bytes_read /
    read_s`` may be off by the part of one read at either end.
    """

    layers_read: int = 0  # reads completed into a staging buffer: taken, discarded, or read ahead and not yet taken
    bytes_read: int = 0  # what those reads moved from the files (whole aligned extents, less what lay past a file's end)
    read_s: float = 0.0  # seconds the reader thread spent inside reads (a failed read's too, without its bytes)
    copy_wait_s: float = 0.0  # seconds it waited for the copy out of a buffer to finish before refilling the buffer
    idle_s: float = 0.0  # seconds it had nothing queued: every buffer filled and not yet taken (or held), or nothing to read ahead
    take_wait_s: float = 0.0  # seconds the consumer (the host thread) blocked in ``take`` until its layer was read
    discarded: int = 0  # layers read ahead and then dropped because another layer was asked for first

    def __sub__(self, earlier: StreamStats) -> StreamStats:
        return StreamStats(*(now - then for now, then in zip(astuple(self), astuple(earlier))))

    @property
    def read_bytes_per_s(self) -> float | None:
        """The disk's rate as the reader saw it, inside its reads; None when no time went to reading."""
        return self.bytes_read / self.read_s if self.read_s > 0 else None


@dataclass(frozen=True)
class StagedLayer:
    """A disk-resident layer, read into a staging buffer: its pieces, and the way to hand the buffer back."""

    pieces: tuple[tuple[torch.Tensor, int], ...]  # (host bytes in the staging buffer, offset in the layer's block)
    _ring: _Ring
    _fill: _Fill

    def release(self, copied: CopyDone | None) -> None:
        """The copies reading the pieces are issued; ``copied`` completes after them (None: they have completed)."""
        self._ring.release(self._fill, copied)


class DiskTier:
    """The disk-resident offloaded layers of one runtime: their layout, the staging ring and its reader thread."""

    def __init__(self, layout: DiskLayout, plan: OffloadPlan, device: torch.device) -> None:
        self.layout = layout
        paths = [extent.path for layer in layout.layers.values() for extent in layer.extents]
        reader = DirectReader(paths)
        buffers = [lazy_host_buffer(layout.staging_bytes) for _ in range(layout.staging_buffers)]
        # The order in which the runtime asks for disk-resident layers after the first pass (see the module docstring).
        schedule = [index for index in sorted(layout.layers) if plan.next_in_slot(index) != index]
        self._ring = _Ring(layout, reader, buffers, sorted(layout.layers), schedule, pin=device.type == "cuda")
        weakref.finalize(self, self._ring.close)
        self.direct = reader.direct

    @property
    def staging_buffers(self) -> tuple[torch.Tensor, ...]:
        """The ring's host buffers (page-locked on a CUDA device)."""
        return tuple(self._ring.buffers)

    def holds(self, offload_index: int) -> bool:
        return offload_index in self.layout.layers

    def take(self, offload_index: int) -> StagedLayer:
        """The layer, read into a staging buffer (blocks until it is); the caller copies it, then releases it."""
        return self._ring.take(offload_index)

    def read_tensor(self, name: str) -> torch.Tensor:
        """The stored value of disk-resident parameter ``name``, read into a fresh CPU tensor."""
        entry = self.layout.sources[name]
        raw = self._ring.reader.read_range(entry.path, entry.offset, entry.nbytes)
        return raw.view(entry.dtype).reshape(entry.shape)

    @property
    def reads(self) -> dict[int, int]:
        """Reads handed to a copy, per disk-resident layer (offload index), since the runtime was built.

        Counted when the runtime takes the layer, not when the reader thread finishes it: a
        read ahead that nobody has taken yet is in neither this count nor ``discarded`` (it
        is in :meth:`stream_stats`'s ``layers_read``), so the count after a forward does not
        depend on how far the reader has got.
        """
        return self._ring.taken()

    def stream_stats(self) -> StreamStats:
        """The stream's counters and times so far (subtract two snapshots for a window)."""
        return self._ring.stream_stats()

    def close(self) -> None:
        """Stop the reader thread and release the files and the staging memory (also done when collected)."""
        self._ring.close()


class _Ring:
    """The staging buffers, the queue of fills, and the reader thread that works through it.

    Every buffer is in exactly one queued, reading or filled fill at any time,
    except the one a consumer holds between ``take`` and ``release``; fills are
    queued, read and taken in queue order. One lock (the condition's) guards it all.
    """

    def __init__(
        self,
        layout: DiskLayout,
        reader: DirectReader,
        buffers: list[torch.Tensor],
        first_pass: list[int],
        schedule: list[int],
        pin: bool,
    ) -> None:
        self.layout = layout
        self.reader = reader
        self.buffers = buffers
        self._schedule = schedule
        self._order: Iterator[int] = itertools.chain(first_pass, itertools.cycle(schedule))  # the layers to queue
        self._fills: deque[_Fill] = deque()
        self._copied: list[CopyDone | None] = [None] * len(buffers)  # what each buffer's next fill waits for
        self._reads = dict.fromkeys(layout.layers, 0)
        self._stats = StreamStats()  # closed intervals; replaced whole under the lock, so a snapshot is a reference
        self._state: str | None = None  # what the reader thread is doing (a StreamStats time field) ...
        self._since = 0.0  # ... since this time.perf_counter()
        self._closed = False
        self._cond = threading.Condition()
        self._pinned = contextlib.ExitStack()
        if pin:
            for buffer in buffers:
                register_pinned(buffer)
                self._pinned.callback(unregister_pinned, buffer)
        with self._cond:
            for buffer in range(len(buffers)):
                self._queue_next(buffer)
        self._thread = threading.Thread(target=self._run, name="prefetch_compile-disk-reader", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- consumer side
    def take(self, offload_index: int) -> StagedLayer:
        began = time.perf_counter()
        with self._cond:
            if self._closed:
                raise RuntimeError("the disk tier of this model is closed; its disk-resident layers cannot be read")
            if not self._fills or self._fills[0].offload_index != offload_index:
                self._restart_at(offload_index)
            fill = self._fills[0]
            while fill.state != "filled":
                if self._closed:
                    raise RuntimeError("the disk tier of this model was closed while a layer was being read")
                self._cond.wait()
            self._add(take_wait_s=time.perf_counter() - began)
            if fill.error is not None:
                self._fills.popleft()
                self._queue_next(fill.buffer)  # the buffer holds nothing the next fill must wait for
                raise fill.error
            self._reads[offload_index] += 1
        buffer = self.buffers[fill.buffer]
        layer = self.layout.layers[offload_index]
        pieces = tuple((buffer[p.staging_offset : p.staging_offset + p.nbytes], p.block_offset) for p in layer.pieces)
        return StagedLayer(pieces, self, fill)

    def release(self, fill: _Fill, copied: CopyDone | None) -> None:
        with self._cond:
            assert self._fills and self._fills[0] is fill, "staging buffers are released in the order they were taken"
            self._fills.popleft()
            self._copied[fill.buffer] = copied
            self._queue_next(fill.buffer)

    def _restart_at(self, offload_index: int) -> None:
        """Drop the read-ahead and queue ``offload_index`` first, then the schedule from the layer after it."""
        while any(fill.state == "reading" for fill in self._fills):
            self._cond.wait()  # a read in progress finishes into its buffer; nobody takes it
        self._add(discarded=sum(fill.state == "filled" and fill.error is None for fill in self._fills))
        self._fills.clear()
        later = [index for index in self._schedule if index > offload_index]
        self._order = itertools.cycle(later + [index for index in self._schedule if index <= offload_index])
        self._fills.append(_Fill(offload_index, 0))
        for buffer in range(1, len(self.buffers)):
            self._queue_next(buffer)
        self._cond.notify_all()

    def _queue_next(self, buffer: int) -> None:
        index = next(self._order, None)
        if index is None:
            return  # nothing more to read ahead (only layers alone in their slots): a request restarts the ring
        self._fills.append(_Fill(index, buffer))
        self._cond.notify_all()

    # ---------------------------------------------------------------- reader side
    def _run(self) -> None:
        while True:
            with self._cond:
                fill = self._next_queued()
                if fill is None:
                    return  # closed
                fill.state = "reading"
                copied, self._copied[fill.buffer] = self._copied[fill.buffer], None
                self._enter("read_s" if copied is None else "copy_wait_s")
            nbytes = 0
            try:
                if copied is not None:
                    copied.synchronize()  # the copy that reads this buffer has finished
                    with self._cond:
                        self._enter("read_s")
                nbytes = self._read(self.layout.layers[fill.offload_index], self.buffers[fill.buffer])
            except BaseException as error:  # handed to the consumer, raised on its thread
                fill.error = error
            with self._cond:
                self._enter(None)
                self._add(layers_read=int(fill.error is None), bytes_read=nbytes)
                fill.state = "filled"
                self._cond.notify_all()

    def _next_queued(self) -> _Fill | None:
        """The first queued fill, idle until there is one; None once the ring is closed. Under the lock."""
        fill = _first_queued(self._fills)
        if fill is None and not self._closed:
            self._enter("idle_s")
            while not self._closed and (fill := _first_queued(self._fills)) is None:
                self._cond.wait()
            self._enter(None)
        return None if self._closed else fill

    def _read(self, layer: DiskLayer, buffer: torch.Tensor) -> int:
        """Read ``layer``'s extents into ``buffer``; the bytes read."""
        base, nbytes = buffer.data_ptr(), 0
        for extent in layer.extents:
            got = self.reader.read(extent.path, extent.file_offset, extent.nbytes, base + extent.staging_offset)
            if got < extent.needed:
                raise CheckpointError(
                    f"{extent.path} ends at byte {extent.file_offset + got}, before the end of "
                    f"{', '.join(extent.names)} (layer {layer.name}): the file shrank since it was loaded"
                )
            nbytes += got
        return nbytes

    # ---------------------------------------------------------------- counters (all under the lock)
    def _enter(self, state: str | None) -> None:
        """The reader thread's time from now on goes to ``state``, a time field of StreamStats (None: to none)."""
        now = time.perf_counter()
        if self._state is not None:
            self._add(**{self._state: now - self._since})
        self._state, self._since = state, now

    def _add(self, **increments: int | float) -> None:
        self._stats = _plus(self._stats, increments)

    def stream_stats(self) -> StreamStats:
        with self._cond:
            if self._state is None:
                return self._stats
            return _plus(self._stats, {self._state: time.perf_counter() - self._since})

    def taken(self) -> dict[int, int]:
        with self._cond:
            return dict(self._reads)

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()  # its read in progress (and the copy it waits for) ends first
        for copied in self._copied:
            if copied is not None:
                copied.synchronize()  # no copy may still read a buffer that is unpinned and unmapped
        self.reader.close()
        self._pinned.close()


def _plus(stats: StreamStats, increments: dict[str, int | float]) -> StreamStats:
    """``stats`` with ``increments`` added to the fields they name."""
    return replace(stats, **{name: getattr(stats, name) + value for name, value in increments.items()})


def _first_queued(fills: deque[_Fill]) -> _Fill | None:
    return next((fill for fill in fills if fill.state == "queued"), None)
