"""The prefetch pass: ``wait_prefetch`` before and ``start_prefetch`` after each offloaded layer's readers.

The pass speaks in offload indices (an offloaded layer's position among the
offloaded layers), never in layer names. Invariant established, for every
offload index L read in the graph:

* ``wait_prefetch(L)`` stands before the first node that reads L's weights and
  is declared to write them, so no reader can be scheduled before it;
* ``start_prefetch(next)``, where ``next`` is the offload index that uses L's
  slot after L, stands after the last reader of L and is declared to write every
  parameter that views that slot, and takes the still-needed values computed
  from L as inputs. No reader of L, fused or not, can run after the slot is
  overwritten.

Two offload indices that share a slot must be read in disjoint stretches of the
graph (both would otherwise need the one buffer at once); a graph that
interleaves them is reported as an error.

Before (offload indices 0-2, one slot; ``w0``..``w2`` are their parameters)::

    mm = aten.mm(x, w0);      tanh = aten.tanh(mm)
    mm_1 = aten.mm(tanh, w1); tanh_1 = aten.tanh(mm_1)
    mm_2 = aten.mm(tanh_1, w2)

After::

    wait_prefetch([w0])
    mm = aten.mm(x, w0)
    start_prefetch([w0, w1], [mm])        # brings in offload 1 once offload 0 is read
    tanh = aten.tanh(mm)
    wait_prefetch([w1])
    mm_1 = aten.mm(tanh, w1)
    start_prefetch([w1, w2], [mm_1])
    tanh_1 = aten.tanh(mm_1)
    wait_prefetch([w2])
    mm_2 = aten.mm(tanh_1, w2)
    start_prefetch([w2, w0], [mm_2])      # the next forward's first offload index

``tests/test_prefetch_pass_graphs.py`` runs the pass on such ``make_fx`` graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import fx

from .param_readers import GraphReads, OffloadReads, ParamInput, analyze_param_reads, live_after
from .sink_weight_only import sink_weight_only_work


class SlotConflictError(RuntimeError):
    """Two offload indices that take turns in one slot are read interleaved."""


@dataclass(frozen=True)
class InsertedOp:
    """One inserted op and why it stands where it does (for dumps and tests)."""

    node: fx.Node
    kind: str  # "wait" or "start"
    offload_index: int  # the offload index waited for or prefetched
    anchor: fx.Node  # the reader the op was placed against
    after: int | None  # for a start: the offload index whose last read frees the slot
    live: tuple[fx.Node, ...]  # for a start: values it forces to be computed first

    @property
    def reason(self) -> str:
        if self.kind == "wait":
            return f"first read of offload {self.offload_index} is {self.anchor.name}"
        return (
            f"last read of offload {self.after} (same slot) is {self.anchor.name}; "
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
    make_wait: Callable[[fx.Graph, list[fx.Node]], fx.Node],
    make_start: Callable[[fx.Graph, list[fx.Node], list[fx.Node]], fx.Node],
) -> PrefetchPassResult:
    """Rewrite ``graph`` in place; ``make_wait``/``make_start`` emit the op nodes at the current insert point."""
    sink_weight_only_work(graph, static_inputs)
    analysis = analyze_param_reads(graph, param_inputs, static_inputs)
    _check_slot_conflicts(analysis, slot_of)
    read = [reads for reads in analysis.offloaded.values() if reads.first is not None]
    live = live_after(graph, analysis, _group_by_node((reads.last, reads.offload_index) for reads in read))

    inserted: list[InsertedOp] = []
    for reads in read:
        with graph.inserting_before(reads.first):
            node = make_wait(graph, reads.params)
        inserted.append(InsertedOp(node, "wait", reads.offload_index, reads.first, None, ()))

    # Starts go in reverse graph order so that two starts after the same reader keep offload order.
    for reads in sorted(read, key=lambda reads: analysis.order[reads.last], reverse=True):
        incoming = next_in_slot(reads.offload_index)
        slot_params = list(reads.params)
        if incoming != reads.offload_index and incoming in analysis.offloaded:
            slot_params += analysis.offloaded[incoming].params
        values = live[(reads.last, reads.offload_index)]
        with graph.inserting_after(reads.last):
            node = make_start(graph, slot_params, values)
        inserted.append(InsertedOp(node, "start", incoming, reads.last, reads.offload_index, tuple(values)))
    graph.lint()
    return PrefetchPassResult(analysis, inserted)


def _group_by_node(pairs) -> dict[fx.Node, list[int]]:
    grouped: dict[fx.Node, list[int]] = {}
    for node, offload_index in pairs:
        grouped.setdefault(node, []).append(offload_index)
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
                    f"read at {earlier.last.name}; raise prefetch_step so they get separate slots, or keep one on the device"
                )
