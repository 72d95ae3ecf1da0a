"""The prefetch pass: ``wait_prefetch`` before and ``start_prefetch`` after each offloaded layer's readers.

The pass speaks in offload indices (an offloaded layer's position among the
offloaded layers), never in layer names. Invariant established, for every
offload index L read in the graph and every chunk C of it (a run of
consecutive pieces of L's block; all of it when its copies are not chunked,
see below):

* ``wait_prefetch(C)`` stands before the first node that reads a parameter of
  C and is declared to write C's parameters, so no reader can be scheduled
  before it;
* ``start_prefetch(C, C')``, where ``C'`` is the same pieces of ``next``, the
  offload index that uses L's slot after L, stands after the last reader of C and is
  declared to write C's and C''s parameters, and takes the still-needed values
  computed from C as inputs. No reader of C, fused or not, can run after those
  bytes of the slot are overwritten, and ``next``'s wait for C' comes after it.

Two offload indices that share a slot must be read in disjoint stretches of the
graph (both would otherwise need the one buffer at once); a graph that
interleaves them is reported as an error.

Before (offload indices 0-2, one slot; ``w0``..``w2`` are their parameters)::

    mm = aten.mm(x, w0);      tanh = aten.tanh(mm)
    mm_1 = aten.mm(tanh, w1); tanh_1 = aten.tanh(mm_1)
    mm_2 = aten.mm(tanh_1, w2)

After, with whole-layer copies::

    wait_prefetch([w0])
    mm = aten.mm(x, w0)
    start_prefetch([w0], [w1], [mm])      # brings in offload 1 once offload 0 is read
    tanh = aten.tanh(mm)
    wait_prefetch([w1])
    mm_1 = aten.mm(tanh, w1)
    start_prefetch([w1], [w2], [mm_1])
    tanh_1 = aten.tanh(mm_1)
    wait_prefetch([w2])
    mm_2 = aten.mm(tanh_1, w2)
    start_prefetch([w2], [w0], [mm_2])    # the next forward's first offload index

**Chunked copies.** With one slot, the copy of the next offload index above
waits for the whole current one to be read, so the copy stream idles while each
offloaded layer computes. When the plan cuts blocks into pieces (the byte
offsets at which every offloaded layer starts a parameter, so piece *k* of the
incoming block overwrites piece *k* of the outgoing one and nothing else), a
copy can move chunk by chunk instead: each chunk as soon as the outgoing offload
index's last reader of the same pieces has run. Offload indices 0 and 1 in one
slot, each a ``q`` and a ``k`` weight (pieces 0 and 1)::

    mm = aten.mm(x, q0);  mm_1 = aten.mm(mm, k0)         # offload 0
    mm_2 = aten.mm(mm_1, q1);  mm_3 = aten.mm(mm_2, k1)  # offload 1

becomes::

    wait_prefetch([q0])
    mm = aten.mm(x, q0)
    start_prefetch([q0], [q1], [mm])      # offload 1's q overwrites q0 while k0 is still read
    wait_prefetch([k0])
    mm_1 = aten.mm(mm, k0)
    start_prefetch([k0], [k1], [mm_1])
    wait_prefetch([q1])
    mm_2 = aten.mm(mm_1, q1)
    start_prefetch([q1], [q0], [mm_2])    # the next forward's offload 0, chunk by chunk too
    wait_prefetch([k1])
    mm_3 = aten.mm(mm_2, k1)
    start_prefetch([k1], [k0], [mm_3])

Chunks follow the order the graph reads the pieces (first reader first), not
the order of the bytes, so the copy stream brings the next block in the order
its forward reads it whatever the parameters' registration order. A chunk
merges pieces that are adjacent both in the block and in that order, up to a
quarter of the block's read bytes, so a decoder block takes a handful of chunks
(a norm weight rides along with the projection packed and read next to it)
rather than one pair of ops per parameter. An offload index alone in its slot
(never copied) and blocks of one piece keep one wait and one start.

``tests/test_prefetch_pass_graphs.py`` runs the pass on such ``make_fx`` graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from torch import fx

from .param_readers import GraphReads, OffloadReads, ParamInput, PieceReads, analyze_param_reads, live_after
from .sink_weight_only import sink_weight_only_work

# A chunk grows by adjacent pieces while it stays within 1 / CHUNKS_PER_LAYER of its block's read bytes.
CHUNKS_PER_LAYER = 4


class SlotConflictError(RuntimeError):
    """Two offload indices that take turns in one slot are read interleaved."""


@dataclass(frozen=True)
class Chunk:
    """A run of consecutive pieces of one offload index's block: moved by one start, awaited by one wait."""

    offload_index: int
    pieces: range
    params: tuple[fx.Node, ...]  # its parameters in those pieces, in piece order (what the ops take)
    first: fx.Node  # first and last reader of any of them
    last: fx.Node
    mask: int  # GraphReads.mask of those pieces: which values are computed from them


@dataclass(frozen=True)
class InsertedOp:
    """One inserted op and why it stands where it does (for dumps and tests)."""

    node: fx.Node
    kind: str  # "wait" or "start"
    offload_index: int  # the offload index waited for or prefetched
    anchor: fx.Node  # the reader the op was placed against
    after: int | None  # for a start: the offload index whose last read frees the slot
    live: tuple[fx.Node, ...]  # for a start: values it forces to be computed first
    pieces: range | None = None  # the pieces it moves or waits for, when its block moves in several chunks

    @property
    def reason(self) -> str:
        part = "" if self.pieces is None else f" {_span(self.pieces)}"
        if self.kind == "wait":
            return f"first read of offload {self.offload_index}{part} is {self.anchor.name}"
        return (
            f"last read of offload {self.after}{part} (same slot) is {self.anchor.name}; "
            f"materialises {[node.name for node in self.live]}"
        )


@dataclass
class PrefetchPassResult:
    analysis: GraphReads
    inserted: list[InsertedOp]


def prefetch_pass(
    graph: fx.Graph,
    param_inputs: dict[fx.Node, ParamInput],
    static_inputs: set[fx.Node],
    *,
    next_in_slot: Callable[[int], int],
    slot_of: Callable[[int], int],
    piece_bytes: Callable[[int], Sequence[int]],
    make_wait: Callable[[fx.Graph, list[fx.Node]], fx.Node],
    make_start: Callable[[fx.Graph, list[fx.Node], list[fx.Node], list[fx.Node]], fx.Node],
) -> PrefetchPassResult:
    """Rewrite ``graph`` in place; ``make_wait``/``make_start`` emit the op nodes at the current insert point.

    ``piece_bytes(i)`` gives the size of each piece of offload index ``i``'s block
    (one entry when its copies are not chunked); ``param_inputs`` say which piece
    holds each parameter.
    """
    sink_weight_only_work(graph, static_inputs)
    analysis = analyze_param_reads(graph, param_inputs, static_inputs)
    _check_slot_conflicts(analysis, slot_of)
    read = [reads for reads in analysis.offloaded.values() if reads.first is not None]
    chunks = {
        reads.offload_index: _chunks(
            reads, analysis, piece_bytes(reads.offload_index), shared=next_in_slot(reads.offload_index) != reads.offload_index
        )
        for reads in read
    }
    every_chunk = [chunk for reads in read for chunk in chunks[reads.offload_index]]
    live = live_after(graph, analysis, _group_by_node((chunk.last, chunk.mask) for chunk in every_chunk))

    inserted: list[InsertedOp] = []
    for chunk in every_chunk:
        with graph.inserting_before(chunk.first):
            node = make_wait(graph, list(chunk.params))
        inserted.append(InsertedOp(node, "wait", chunk.offload_index, chunk.first, None, (), _part(chunk, chunks)))

    # Starts go in reverse graph order so that two starts after the same reader keep offload and chunk order.
    for chunk in sorted(every_chunk, key=lambda chunk: analysis.order[chunk.last], reverse=True):
        outgoing = chunk.offload_index
        incoming = next_in_slot(outgoing)
        incoming_params: list[fx.Node] = []
        if incoming != outgoing and incoming in analysis.offloaded:
            incoming_params = _params_in(analysis.offloaded[incoming], chunk.pieces)
        values = live[(chunk.last, chunk.mask)]
        with graph.inserting_after(chunk.last):
            node = make_start(graph, list(chunk.params), incoming_params, values)
        inserted.append(InsertedOp(node, "start", incoming, chunk.last, outgoing, tuple(values), _part(chunk, chunks)))
    graph.lint()
    return PrefetchPassResult(analysis, inserted)


def _chunks(reads: OffloadReads, analysis: GraphReads, sizes: Sequence[int], *, shared: bool) -> list[Chunk]:
    """Cut an offload index's read pieces into chunks (one, when it is alone in its slot: it is never copied)."""
    order = analysis.order
    read = sorted(
        (piece for piece in reads.pieces.values() if piece.first is not None),
        key=lambda piece: (order[piece.first], piece.piece),
    )
    groups = _runs(read, sizes) if shared else [sorted(read, key=lambda piece: piece.piece)]
    return [
        Chunk(
            offload_index=reads.offload_index,
            pieces=range(group[0].piece, group[-1].piece + 1),
            params=tuple(node for piece in group for node in piece.params),
            first=min((piece.first for piece in group), key=order.__getitem__),
            last=max((piece.last for piece in group), key=order.__getitem__),
            mask=analysis.mask(reads.offload_index, (piece.piece for piece in group)),
        )
        for group in groups
    ]


def _runs(read: list[PieceReads], sizes: Sequence[int]) -> list[list[PieceReads]]:
    """Pieces in first-read order, cut into runs adjacent in the block, each of at most ``1 / CHUNKS_PER_LAYER``
    of the read bytes (a piece larger than that is a run of its own)."""
    target = sum(sizes[piece.piece] for piece in read) / CHUNKS_PER_LAYER
    runs: list[list[PieceReads]] = []
    for piece in read:
        if (
            runs
            and piece.piece == runs[-1][-1].piece + 1
            and sum(sizes[p.piece] for p in runs[-1]) + sizes[piece.piece] <= target
        ):
            runs[-1].append(piece)
        else:
            runs.append([piece])
    return runs


def _params_in(reads: OffloadReads, pieces: range) -> list[fx.Node]:
    """The offload index's parameters in the graph that lie in ``pieces``, in piece order."""
    return [node for piece in pieces if piece in reads.pieces for node in reads.pieces[piece].params]


def _part(chunk: Chunk, chunks: dict[int, list[Chunk]]) -> range | None:
    return chunk.pieces if len(chunks[chunk.offload_index]) > 1 else None


def _span(pieces: range) -> str:
    return f"piece {pieces.start}" if len(pieces) == 1 else f"pieces {pieces.start}-{pieces.stop - 1}"


def _group_by_node(pairs) -> dict[fx.Node, list[int]]:
    grouped: dict[fx.Node, list[int]] = {}
    for node, mask in pairs:
        grouped.setdefault(node, []).append(mask)
    return grouped


def _check_slot_conflicts(analysis: GraphReads, slot_of: Callable[[int], int]) -> None:
    """Offload indices sharing a slot must be read in disjoint stretches of the graph.

    Otherwise the second one's copy would overwrite the first while it is still
    being read (a node that reads both is the extreme case).
    """
    by_slot: dict[int, list[OffloadReads]] = {}
    for reads in analysis.offloaded.values():
        if reads.first is not None:
            by_slot.setdefault(slot_of(reads.offload_index), []).append(reads)
    order = analysis.order
    for slot, sharing in by_slot.items():
        sharing.sort(key=lambda reads: order[reads.first])
        for earlier, later in zip(sharing, sharing[1:]):
            if order[later.first] <= order[earlier.last]:
                raise SlotConflictError(
                    f"offload indices {earlier.offload_index} and {later.offload_index} share slot {slot}, but offload "
                    f"{later.offload_index} is read at {later.first.name} before offload {earlier.offload_index}'s last "
                    f"read at {earlier.last.name}. A graph reads a slot's layers so when it runs the blocks more than "
                    "once (a compiled function that calls the model twice, as classifier-free guidance does: compile "
                    "the model itself and call it once per pass) or reads a layer's weights outside its turn. Raise "
                    "prefetch_step so they get separate slots, or keep one on the device"
                )
