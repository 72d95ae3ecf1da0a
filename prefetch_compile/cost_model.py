"""Predicted time per forward of an offload plan: copies scheduled against the compute that hides them.

The prediction replays the runtime's rules on a timeline instead of adding up
averages, because what hides a copy is positional: the copy of offloaded layer
*k* may start only once the previous occupant of its slot (offloaded layer
*k - slots*) has been read for the last time and the copy stream is free, and
it must end before layer *k*'s first read. The last offloaded layers prefetch
the first ones for the next forward, so one forward depends on the one before;
the simulation runs a few forwards back to back and reports the last, which is
the steady state that back-to-back calls measure.

Inputs are a :class:`CostTable`: the pinned host-to-device bandwidth as a
function of copy size, the compute time of each layer of the layer list, and the
compute outside it (embedding, head), and where in each layer its offloaded
parameters are read: the compute before the first and after the last read
(``read_spans``), and, for chunked copies, the same per chunk (``chunk_reads``).

A chunked copy (one slot shared by several layers, see ``plan.chunks_copies``)
moves a layer's block in chunks ordered by first read: chunk *j* of the
incoming layer overwrites the bytes of chunk *j* of the outgoing one, so it may
start once the outgoing layer's last reader of chunk *j* has run, and the
compute stream waits for it before its own first reader of chunk *j*. The
copy stream thus starts working while the outgoing layer still computes, and
the incoming layer's later chunks may arrive while its earlier ones are read.
With the whole layer as one chunk this is the whole-layer rule above.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

# Forwards simulated back to back; the state (copy finish times carried into the next
# forward) is settled after two, so the third is the steady state.
STEADY_STATE_FORWARDS = 3


@dataclass(frozen=True)
class BandwidthCurve:
    """Pinned host-to-device bandwidth at a few copy sizes, interpolated in log(size) between them.

    Small copies run below the link's peak (fixed cost per copy), so a plan of
    many small blocks must not be priced at the bandwidth of 1 GiB copies.
    Outside the measured sizes the nearest measurement is used.
    """

    sizes: tuple[int, ...]  # bytes per copy, increasing
    bytes_per_s: tuple[float, ...]  # bandwidth measured at each size

    def __post_init__(self) -> None:
        if not self.sizes or len(self.sizes) != len(self.bytes_per_s):
            raise ValueError("a bandwidth curve needs one bandwidth per copy size, and at least one")
        if list(self.sizes) != sorted(set(self.sizes)) or min(self.bytes_per_s) <= 0:
            raise ValueError(f"copy sizes must increase and bandwidths be positive: {self}")

    @classmethod
    def constant(cls, bytes_per_s: float) -> BandwidthCurve:
        return cls((1,), (float(bytes_per_s),))

    def bandwidth(self, nbytes: int) -> float:
        position = bisect.bisect_left(self.sizes, nbytes)
        if position == 0:
            return self.bytes_per_s[0]
        if position == len(self.sizes):
            return self.bytes_per_s[-1]
        low, high = self.sizes[position - 1], self.sizes[position]
        weight = (math.log(nbytes) - math.log(low)) / (math.log(high) - math.log(low))
        return self.bytes_per_s[position - 1] + weight * (self.bytes_per_s[position] - self.bytes_per_s[position - 1])

    def copy_seconds(self, nbytes: int) -> float:
        return nbytes / self.bandwidth(nbytes) if nbytes else 0.0


@dataclass(frozen=True)
class ChunkRead:
    """One chunk of a layer's copy: its share of the block's bytes, and when the layer reads it."""

    share: float  # fraction of the layer's offloaded bytes
    first: float  # seconds into the layer's compute when its first reader starts
    last: float  # seconds into the layer's compute when its last reader ends


@dataclass(frozen=True)
class ChunkCopy:
    """One chunk as the simulator takes it: how long it copies, and when its layer reads it."""

    seconds: float
    first: float
    last: float


@dataclass(frozen=True)
class CostTable:
    """Everything the prediction needs to know about the device and the model at one input shape."""

    bandwidth: BandwidthCurve
    layer_seconds: tuple[float, ...]  # compute time of each layer of the layer list, in order
    outside_seconds: float = 0.0  # compute outside the layer list per forward (only the sum matters in steady state)
    source: str = "injected"  # how the compute times were obtained: "calibrated", "roofline", "injected"
    # Per parameter filter (offload_params), per layer: seconds of the layer's compute before the first
    # and after the last read of what the filter offloads. A filter not listed reads over the whole layer.
    read_spans: Mapping[tuple[str, ...], tuple[tuple[float, float], ...]] = field(default_factory=dict)
    # Per parameter filter, per layer: the chunks a chunked copy moves the filter's bytes in, in copy order.
    # A filter not listed is priced as one chunk per layer (a whole-layer copy) even where the plan chunks.
    chunk_reads: Mapping[tuple[str, ...], tuple[tuple[ChunkRead, ...], ...]] = field(default_factory=dict)

    def spans(self, names: tuple[str, ...], layers: Sequence[int]) -> list[tuple[float, float]]:
        per_layer = self.read_spans.get(names)
        return [per_layer[i] if per_layer else (0.0, 0.0) for i in layers]

    def chunks(self, names: tuple[str, ...], layers: Sequence[int]) -> list[tuple[ChunkRead, ...]] | None:
        """The chunks of each of ``layers``, or None where the table has none or the layers' differ.

        Chunk *j* of one layer overwrites chunk *j* of the layer before it in the slot only if
        every layer is cut alike (the plan cuts at parameter starts that all offloaded blocks
        share); the table's chunks are trusted only then.
        """
        per_layer = self.chunk_reads.get(names)
        if not per_layer or not layers:
            return None
        chosen = [per_layer[i] for i in layers]
        shares = {tuple(chunk.share for chunk in chunks) for chunks in chosen}
        return chosen if len(shares) == 1 and len(chosen[0]) > 1 else None

    def to_dict(self) -> dict:
        """Plain JSON types (filters become lists), the form :meth:`from_json` reads."""
        return {
            "bandwidth": {"sizes": list(self.bandwidth.sizes), "bytes_per_s": list(self.bandwidth.bytes_per_s)},
            "layer_seconds": list(self.layer_seconds),
            "outside_seconds": self.outside_seconds,
            "source": self.source,
            "read_spans": [{"offload_params": list(names), "spans": spans} for names, spans in self.read_spans.items()],
            "chunk_reads": [
                {"offload_params": list(names), "chunks": [[astuple(chunk) for chunk in layer] for layer in layers]}
                for names, layers in self.chunk_reads.items()
            ],
        }

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_json(cls, path: str | Path) -> CostTable:
        raw = json.loads(Path(path).read_text())
        bandwidth = BandwidthCurve(tuple(raw["bandwidth"]["sizes"]), tuple(raw["bandwidth"]["bytes_per_s"]))
        spans = {
            tuple(entry["offload_params"]): tuple((float(pre), float(post)) for pre, post in entry["spans"])
            for entry in raw.get("read_spans", [])
        }
        chunks = {
            tuple(entry["offload_params"]): tuple(
                tuple(ChunkRead(*map(float, chunk)) for chunk in layer) for layer in entry["chunks"]
            )
            for entry in raw.get("chunk_reads", [])
        }
        return cls(
            bandwidth,
            tuple(raw["layer_seconds"]),
            raw.get("outside_seconds", 0.0),
            raw.get("source", "injected"),
            spans,
            chunks,
        )


@dataclass(frozen=True)
class CopyTiming:
    """One offloaded layer's copy in the steady-state forward (seconds from the forward's start)."""

    offload_index: int
    layer: int  # index in the layer list
    seconds: float  # duration of the copy
    began: float  # when the copy stream started it (negative: during the previous forward)
    needed: float  # when the compute stream reached the layer's first read
    stall: float  # how long the compute stream waited for it


@dataclass(frozen=True)
class Schedule:
    """The steady-state forward of a plan: its duration and where each copy ran."""

    forward_seconds: float
    compute_seconds: float  # the same forward with every layer resident
    copies: tuple[CopyTiming, ...]

    @property
    def stall_seconds(self) -> float:
        return sum(copy.stall for copy in self.copies)


def simulate(
    layer_seconds: Sequence[float],
    offloaded: Sequence[int],
    copy_seconds: Sequence[float],
    slots: int,
    outside_seconds: float = 0.0,
    read_spans: Sequence[tuple[float, float]] | None = None,
    forwards: int = STEADY_STATE_FORWARDS,
) -> Schedule:
    """The steady-state schedule of ``offloaded`` layers (increasing indices) sharing ``slots`` device slots.

    ``copy_seconds[k]`` is the copy time of the k-th offloaded layer. The rules
    are the runtime's: offloaded layer k lives in slot ``k % slots``; its copy is
    issued after the last read of offloaded layer ``k - slots`` (wrapping around
    to the previous forward for the first ones), runs on one copy stream in
    issue order, and the compute stream waits for it before reading layer k.
    With no more offloaded layers than slots, nothing is ever copied again.
    ``read_spans[k]`` is the compute of layer k before its first read and after
    its last (default: the reads span the whole layer).
    """
    if len(copy_seconds) != len(offloaded):
        raise ValueError(f"{len(offloaded)} offloaded layers but {len(copy_seconds)} copy times")
    spans = list(read_spans) if read_spans is not None else [(0.0, 0.0)] * len(offloaded)
    if len(spans) != len(offloaded):
        raise ValueError(f"{len(offloaded)} offloaded layers but {len(spans)} read spans")
    _check_offloaded(layer_seconds, offloaded)
    chunks = [
        (ChunkCopy(seconds, pre, layer_seconds[layer] - post),)
        for layer, seconds, (pre, post) in zip(offloaded, copy_seconds, spans)
    ]
    return simulate_chunks(layer_seconds, offloaded, chunks, slots, outside_seconds, forwards)


def simulate_chunks(
    layer_seconds: Sequence[float],
    offloaded: Sequence[int],
    chunks: Sequence[Sequence[ChunkCopy]],
    slots: int,
    outside_seconds: float = 0.0,
    forwards: int = STEADY_STATE_FORWARDS,
) -> Schedule:
    """:func:`simulate` with each offloaded layer's copy in chunks (``chunks[k]``, in copy order).

    Chunk j of offloaded layer ``k + slots`` is issued once layer k's last
    reader of chunk j has run, and layer ``k + slots`` waits for it before its
    first reader of chunk j; the copy stream runs chunks in issue order. Every
    layer that is copied must have as many chunks as the others.
    """
    _check_offloaded(layer_seconds, offloaded)
    if len(chunks) != len(offloaded):
        raise ValueError(f"{len(offloaded)} offloaded layers but {len(chunks)} chunk lists")
    slots = min(slots, len(offloaded))
    copying = len(offloaded) > slots
    if copying and len({len(layer) for layer in chunks}) != 1:
        raise ValueError(f"layers that share slots must be cut into as many chunks: {[len(c) for c in chunks]}")
    compute = sum(layer_seconds) + outside_seconds
    position = {layer: k for k, layer in enumerate(offloaded)}
    ready = [[0.0] * len(layer) for layer in chunks]  # when each chunk's latest copy finishes
    began = [[0.0] * len(layer) for layer in chunks]
    copy_free = clock = 0.0
    for _ in range(forwards):
        forward_start = clock
        needed, stall = [0.0] * len(offloaded), [0.0] * len(offloaded)
        for layer, seconds in enumerate(layer_seconds):
            k = position.get(layer)
            if k is None:
                clock += seconds
                continue
            following = (k + slots) % len(offloaded)
            start, delay = clock, 0.0
            # Waits before their reader, issues after theirs; at one instant the reader that ends comes first,
            # except a chunk's own wait, which precedes its issue.
            events = sorted(
                [(chunk.first, 1, j) for j, chunk in enumerate(chunks[k])]
                + ([(chunk.last, 0 if chunk.last > chunk.first else 2, j) for j, chunk in enumerate(chunks[k])] if copying else [])
            )
            needed[k] = start + min(chunk.first for chunk in chunks[k])
            for offset, kind, j in events:
                now = start + delay + offset
                if kind == 1:
                    delay += max(0.0, ready[k][j] - now)
                else:
                    began[following][j] = max(now, copy_free)
                    copy_free = ready[following][j] = began[following][j] + chunks[following][j].seconds
            stall[k] = delay
            clock = start + delay + seconds
        clock += outside_seconds
    # began[k] for the first slots' layers refers to the copy issued during this last forward, for the next one:
    # shift it back by one period so every entry describes the copy this forward waited for.
    period = clock - forward_start
    copies = tuple(
        CopyTiming(
            offload_index=k,
            layer=layer,
            seconds=sum(chunk.seconds for chunk in chunks[k]) if copying else 0.0,
            began=(min(began[k]) - (period if k < slots else 0.0) - forward_start) if copying else 0.0,
            needed=needed[k] - forward_start,
            stall=stall[k],
        )
        for k, layer in enumerate(offloaded)
    )
    return Schedule(forward_seconds=period, compute_seconds=compute, copies=copies)


def _check_offloaded(layer_seconds: Sequence[float], offloaded: Sequence[int]) -> None:
    if list(offloaded) != sorted(set(offloaded)) or (offloaded and not 0 <= offloaded[0] <= offloaded[-1] < len(layer_seconds)):
        raise ValueError(f"offloaded layers must be increasing indices into {len(layer_seconds)} layers: {offloaded}")
