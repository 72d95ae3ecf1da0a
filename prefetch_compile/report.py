"""What the copies actually did: per offloaded layer, bytes, copy time, the compute that hid it, and the stall.

A :class:`CopyRecorder` is an object the runtime calls at five points (copy
issued, copy begun, copy ended on the copy stream; wait begun and ended on the
compute stream). A copy moves a whole layer or, with chunked copies, a run of
its pieces; a wait waits for some pieces, so a layer may have several of each
per forward, and a wait is paired with the copy that brought its first piece. On CUDA each point is a timing event on its stream, so the
numbers are the device's timeline, not the host's; on the CPU, where copies are
synchronous, they are wall-clock times. Events are only read when a report is
asked for, so recording costs a few microseconds per copy and no
synchronisation. Nothing is recorded inside a CUDA graph capture (a replay
re-runs the captured copies without calling the runtime).

The stall of a layer is how long the compute stream sat in ``wait`` for its
pieces, per forward: summed over the layers it is what offloading added to a forward's time,
which is how the report is checked against the measured time minus the
compute-only time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from tabulate import tabulate

from .plan import LayerPlan
from .runtime import format_bytes


# How many forwards every runtime records without start_recording() and sums up in one log line: the
# ones after the last graph compiled, whose compile would otherwise count in the copies' windows (the
# first forward compiles, and on the one-line path offloads; generate compiles again for its decode).
FIRST_TIMED_FORWARDS = 3


@dataclass
class _Copy:
    issued: object  # compute-stream mark: the copy may start (its bytes' previous owner has been read)
    nbytes: int
    began: object | None = None  # copy-stream mark: the copy started
    ended: object | None = None  # copy-stream mark: the copy finished


@dataclass
class _Wait:
    began: object  # compute-stream mark: the pieces are needed
    pieces: range
    ended: object | None = None  # compute-stream mark: the copy is in, compute goes on
    missed: bool = False  # nobody prefetched the pieces: the wait copied them on the spot
    copy: _Copy | None = None  # the copy this wait waited for


@dataclass(frozen=True)
class LayerReport:
    offload_index: int
    name: str
    nbytes: int  # the layer's block
    copies: int  # copies of it or of its chunks
    copied_bytes: int
    copy_s: float  # mean duration of one copy
    window_s: float | None  # mean compute-stream time from the copy's issue to the layer's first read
    stall_s: float  # time the compute stream waited for the layer's pieces, per forward (all its waits)
    waits: int
    misses: int


@dataclass(frozen=True)
class CopyReport:
    """Recorded copies since the recorder was (re)started, per layer and in total."""

    layers: tuple[LayerReport, ...]
    forwards: int  # forwards recorded (see CopyRecorder._forwards)

    @property
    def copies(self) -> int:
        return sum(row.copies for row in self.layers)

    @property
    def copied_bytes(self) -> int:
        return sum(row.copied_bytes for row in self.layers)

    @property
    def copy_seconds(self) -> float:
        return sum(row.copy_s * row.copies for row in self.layers)

    @property
    def misses(self) -> int:
        return sum(row.misses for row in self.layers)

    @property
    def bandwidth(self) -> float | None:
        """Bytes per second while a copy ran (None before any copy)."""
        return self.copied_bytes / self.copy_seconds if self.copy_seconds else None

    @property
    def stall_per_forward(self) -> float:
        """What offloading added to a forward: the compute stream's total wait, per forward."""
        return sum(row.stall_s for row in self.layers)

    def efficiency(self, compute_only_s: float, measured_s: float) -> float | None:
        """limit / measured, limit = max(compute-only time, one forward's copies at the achieved bandwidth)."""
        if not self.forwards or self.bandwidth is None:
            return None
        return max(compute_only_s, self.copied_bytes / self.forwards / self.bandwidth) / measured_s

    def totals(self) -> str:
        """The totals in one line (the log line of the first timed forwards is this)."""
        bandwidth = "-" if self.bandwidth is None else f"{self.bandwidth / 1e9:.3g} GB/s"  # 0.07 on a slow CPU, not 0.0
        return (
            f"{self.forwards} forwards, {self.copies} copies, {format_bytes(self.copied_bytes)} copied, "
            f"achieved bandwidth {bandwidth}, stall per forward {self.stall_per_forward * 1e3:.3f} ms, "
            f"ensure-path misses {self.misses}"
        )

    def render(self, compute_only_s: float | None = None, measured_s: float | None = None) -> str:
        rows = [
            {
                "layer": layer.name,
                "bytes": f"{layer.nbytes:,}",
                "copies": layer.copies,
                "copy ms": f"{layer.copy_s * 1e3:.3f}",
                "window ms": "-" if layer.window_s is None else f"{layer.window_s * 1e3:.3f}",
                "stall ms/forward": f"{layer.stall_s * 1e3:.3f}",
                "misses": layer.misses,
            }
            for layer in self.layers
        ]
        totals = self.totals()
        if compute_only_s is not None and measured_s is not None:
            efficiency = self.efficiency(compute_only_s, measured_s)
            totals += f", overlap efficiency {'-' if efficiency is None else f'{efficiency:.2f}'}"
        return tabulate(rows, headers="keys") + "\n" + totals


class CopyRecorder:
    """Collects the marks the runtime reports; :meth:`report` turns them into a :class:`CopyReport`.

    ``window`` (forward numbers, counted from 1) limits recording to those forwards:
    what came before the window's first forward is dropped when it begins, and
    nothing is recorded from the forward after its last one (:attr:`closed`).
    Should the forwards never be told apart (waits that never return to the first
    offloaded layer), a window gives up after ``max_waits`` waits (:attr:`abandoned`)
    rather than grow without end.
    """

    def __init__(
        self, layers: tuple[LayerPlan, ...], device: torch.device, window: range | None = None, max_waits: int = 0
    ) -> None:
        self.layers = layers
        self.cuda = device.type == "cuda"
        self.window = window
        self.max_waits = max_waits
        self.closed = self.abandoned = False
        self.reset()

    def reset(self) -> None:
        self._pending: dict[tuple[int, int], _Copy] = {}  # by (offload index, piece): copies not yet waited for
        self._clear()
        self.forwards_begun = 0  # see _begins_forward
        self._previous: int | None = None  # offload index of the last wait
        self._waited: set[int] = set()  # pieces waited for in this forward (a single offloaded layer's)

    def _clear(self) -> None:
        """Drop what was recorded, but not the copies still to be waited for (they pair with later waits)."""
        self._copies: list[tuple[int, _Copy]] = []
        self._waits: list[tuple[int, _Wait]] = []
        self._current: _Copy | None = None  # the copy being issued, between copy_issued and copy_ended
        # (offload index, bytes) of each host-to-device memcpy, in issue order, those of CUDA graph replays
        # and of the restores before them included: what names the copies of a profiler trace (timeline.py).
        self.memcpys: list[tuple[int, int]] = []

    def postpone(self, first: int) -> None:
        """Start the window at forward ``first`` (a later one) instead, keeping its length."""
        assert self.window is not None and first > self.forwards_begun
        self.window = range(first, first + len(self.window))

    @property
    def forwards(self) -> int:
        """Forwards recorded: those begun, less the ones before the window."""
        recorded = self.forwards_begun
        if self.window is not None:
            recorded = min(recorded, self.window.stop - 1) - (self.window.start - 1)
        return max(0, recorded)

    # ------------------------------------------------------------ called by the runtime
    def copy_issued(
        self, offload_index: int, pieces: Sequence[int], memcpy_bytes: Sequence[int], compute: torch.cuda.Stream | None
    ) -> None:
        """A copy of ``pieces`` of a layer is about to be issued, as one memcpy per entry of ``memcpy_bytes``."""
        self._current = None
        if self.closed or self._capturing():
            return
        self.memcpys += [(offload_index, nbytes) for nbytes in memcpy_bytes]
        self._current = copy = _Copy(issued=self._mark(compute), nbytes=sum(memcpy_bytes))
        for piece in pieces:
            self._pending[(offload_index, piece)] = copy
        self._copies.append((offload_index, copy))

    def copy_began(self, stream: torch.cuda.Stream | None) -> None:
        if self._current is not None:
            self._current.began = self._mark(stream)

    def copy_ended(self, stream: torch.cuda.Stream | None) -> None:
        if self._current is not None:
            self._current.ended = self._mark(stream)

    def untimed_copies(self, memcpys: Sequence[tuple[int, int]]) -> None:
        """Memcpys made without the runtime's timing marks: a replay's captured copies, a restore's."""
        if not self.closed:
            self.memcpys += memcpys

    def wait_began(self, offload_index: int, pieces: range, compute: torch.cuda.Stream | None, missed: bool) -> None:
        if self.closed or self._capturing():
            return
        if self._begins_forward(offload_index, pieces):
            self.forwards_begun += 1
            if self.window is not None and self.forwards_begun == self.window.start:
                self._clear()
            elif self.window is not None and self.forwards_begun == self.window.stop:
                self.closed = True
                return
        if self.max_waits and len(self._waits) >= self.max_waits:
            self.closed = self.abandoned = True
            return
        copies = [self._pending.pop((offload_index, piece), None) for piece in pieces]
        copy = next((copy for copy in copies if copy is not None), None)
        self._waits.append((offload_index, _Wait(self._mark(compute), pieces, missed=missed, copy=copy)))

    def _begins_forward(self, offload_index: int, pieces: range) -> bool:
        """Whether this wait is the first of a forward: a return to the first offloaded layer after other layers.

        A forward waits for its first offloaded layer once per piece it reads, and may wait for the
        same pieces twice (a block compiled on its own waits in its graph and in its eager hook), so
        neither waits nor pieces count forwards; a return to the first layer after other layers does.
        With one offloaded layer there is no other layer to separate the forwards: a wait for a piece
        already waited for begins the next one.
        """
        first = self.layers[0].offload_index
        previous, self._previous = self._previous, offload_index
        if len(self.layers) > 1:
            return offload_index == first and previous != first
        again = not self._waited.isdisjoint(pieces)
        if again or previous is None:
            self._waited = set(pieces)
            return True
        self._waited.update(pieces)
        return False

    def wait_ended(self, offload_index: int, compute: torch.cuda.Stream | None) -> None:
        if self.closed or self._capturing() or not self._waits or self._waits[-1][0] != offload_index:
            return
        self._waits[-1][1].ended = self._mark(compute)

    # ------------------------------------------------------------ reading
    def _events(self) -> Iterator[torch.cuda.Event]:
        if self.cuda:
            for _, copy in self._copies:
                yield from (mark for mark in (copy.issued, copy.began, copy.ended) if mark is not None)
            for _, wait in self._waits:
                yield from (mark for mark in (wait.began, wait.ended) if mark is not None)

    def complete(self) -> bool:
        """Whether every mark recorded has been reached on its stream, so that a report waits for nothing."""
        return all(event.query() for event in self._events())

    def report(self) -> CopyReport:
        """Per-layer means over everything recorded since :meth:`reset` (waits for its marks, not for the device)."""
        for event in self._events():
            event.synchronize()
        rows = []
        forwards = self.forwards
        for layer in self.layers:
            index = layer.offload_index
            copies = [c for i, c in self._copies if i == index and c.began is not None and c.ended is not None]
            waits = [w for i, w in self._waits if i == index and w.ended is not None]
            windows = [self._seconds(w.copy.issued, w.began) for w in waits if w.copy is not None and not w.missed]
            rows.append(
                LayerReport(
                    offload_index=index,
                    name=layer.name,
                    nbytes=layer.nbytes,
                    copies=len(copies),
                    copied_bytes=sum(c.nbytes for c in copies),
                    copy_s=_mean([self._seconds(c.began, c.ended) for c in copies]),
                    window_s=_mean(windows) if windows else None,
                    stall_s=sum(self._seconds(w.began, w.ended) for w in waits) / forwards if forwards else 0.0,
                    waits=len(waits),
                    misses=sum(w.missed for w in waits),
                )
            )
        return CopyReport(tuple(rows), forwards)

    # ------------------------------------------------------------ marks
    def _mark(self, stream: torch.cuda.Stream | None) -> object:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def _seconds(self, start: object, end: object) -> float:
        if self.cuda:
            return max(0.0, start.elapsed_time(end) / 1e3)
        return max(0.0, end - start)

    def _capturing(self) -> bool:
        return self.cuda and torch.cuda.is_current_stream_capturing()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
