"""Which nodes of an FX graph read the weights of which offload index.

A node *reads* offload index L when it consumes one of L's parameters, a view of one,
or the result of weight-only work on them (a cast, a dequantisation, a
transposed copy: nodes whose inputs are all parameters or constants). Such
weight-only results can be fused by Inductor into their consumers, which then
read the slot directly, so their consumers count as readers too.

Each parameter also belongs to one *piece* of its layer's block (the plan's
unit of copying; a block is one piece unless the plan chunks copies), and the
reads are kept per piece too: the first and last reader of each piece bound
where a chunked copy may overwrite it.

The analysis also finds, for any point of the graph, the values computed from
L (or from some of its pieces) that are still needed after it ("live"): the
prefetch that overwrites those bytes of L's slot takes them as inputs so they
are materialised before the copy.

Works on both Dynamo's torch-level graphs and AOT's ATen-level graphs: it
relies only on graph structure and on the fake tensors in ``node.meta``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef

READ_DIRECT = "direct"
READ_VIEW = "view"
READ_WEIGHT_ONLY = "weight-only work"
READ_CONSUMER = "consumer of weight-only work"


@dataclass(frozen=True)
class ParamInput:
    """A placeholder that holds one offloaded parameter."""

    offload_index: int  # position of the parameter's layer among the offloaded layers (never its layer index)
    name: str  # the parameter's dotted name in the model
    piece: int = 0  # the piece of its layer's block that holds it (plan.piece_of)


@dataclass
class PieceReads:
    """One piece of an offloaded layer's block inside one graph: its parameters and their first and last reader."""

    piece: int
    params: list[fx.Node] = field(default_factory=list)
    first: fx.Node | None = None
    last: fx.Node | None = None


@dataclass
class OffloadReads:
    """Everything the pass needs to know about one offload index inside one graph."""

    offload_index: int
    params: list[fx.Node] = field(default_factory=list)  # its parameter placeholders
    readers: dict[fx.Node, str] = field(default_factory=dict)  # node -> how it reads (READ_*)
    first: fx.Node | None = None
    last: fx.Node | None = None
    pieces: dict[int, PieceReads] = field(default_factory=dict)  # by piece, those that hold parameters in the graph


@dataclass
class GraphReads:
    """The result of :func:`analyze_param_reads`."""

    offloaded: dict[int, OffloadReads]  # by offload index
    order: dict[fx.Node, int]
    depends_on: dict[fx.Node, int]  # bitmask over (offload index, piece) pairs (see mask()): whose weights flowed into the node
    reads: dict[fx.Node, list[tuple[int, str, str]]]  # node -> [(offload index, parameter name, how)] for annotation
    bits: dict[tuple[int, int], int]  # (offload index, piece) -> its bit in depends_on

    def mask(self, offload_index: int, pieces: Iterable[int] | None = None) -> int:
        """The depends_on bits of an offload index's pieces (all of those in the graph by default)."""
        if pieces is None:
            pieces = self.offloaded[offload_index].pieces
        return sum(1 << self.bits[(offload_index, piece)] for piece in pieces if (offload_index, piece) in self.bits)


def node_value(node: fx.Node) -> object:
    """The fake value of a node in either IR (ATen graphs use 'val', Dynamo graphs 'example_value')."""
    return node.meta.get("val", node.meta.get("example_value"))


def analyze_param_reads(
    graph: fx.Graph, param_inputs: dict[fx.Node, ParamInput], static_inputs: set[fx.Node]
) -> GraphReads:
    """Classify every node by the offload indices whose weights it reads.

    ``static_inputs`` are the placeholders of all parameters (kept or offloaded):
    work whose inputs are all static is weight-only work.
    """
    nodes = list(graph.nodes)
    order = {node: position for position, node in enumerate(nodes)}
    slot_storages = {_storage(node) for node in param_inputs} - {None}
    depends_on: dict[fx.Node, int] = {}
    is_static: dict[fx.Node, bool] = {}
    param_of: dict[fx.Node, ParamInput] = {}  # aliases (views) of offloaded parameters
    by_offload = {info.offload_index: OffloadReads(info.offload_index) for info in param_inputs.values()}
    read_params: dict[fx.Node, dict[ParamInput, None]] = {}  # node -> the parameters it reads, in order
    bits = {key: bit for bit, key in enumerate(dict.fromkeys((i.offload_index, i.piece) for i in param_inputs.values()))}
    reads: dict[fx.Node, list[tuple[int, str, str]]] = {}

    for node in nodes:
        inputs = node.all_input_nodes
        if node.op == "placeholder":
            info = param_inputs.get(node)
            depends_on[node] = 1 << bits[(info.offload_index, info.piece)] if info else 0
            is_static[node] = node in static_inputs
            if info:
                param_of[node] = info
                entry = by_offload[info.offload_index]
                entry.params.append(node)
                entry.pieces.setdefault(info.piece, PieceReads(info.piece)).params.append(node)
            continue
        depends_on[node] = 0
        for source in inputs:
            depends_on[node] |= depends_on[source]
        is_static[node] = node.op == "get_attr" or (bool(inputs) and all(is_static[s] for s in inputs))

        for source in inputs:
            if source in param_of:
                how = READ_DIRECT if source.op == "placeholder" else READ_VIEW
                _record(by_offload, reads, read_params, node, param_of[source], how)
            elif is_static[source] and depends_on[source] and source.op != "placeholder":
                for info in read_params.get(source, ()):
                    how = READ_WEIGHT_ONLY if is_static[node] else READ_CONSUMER
                    _record(by_offload, reads, read_params, node, info, how)

        aliased = _aliased_param(node, inputs, param_of, slot_storages)
        if aliased is not None:
            param_of[node] = aliased

    for entry in by_offload.values():
        if entry.readers:
            entry.first = min(entry.readers, key=order.__getitem__)
            entry.last = max(entry.readers, key=order.__getitem__)
    return GraphReads(by_offload, order, depends_on, reads, bits)


def live_after(graph: fx.Graph, analysis: GraphReads, points: dict[fx.Node, list[int]]) -> dict[tuple[fx.Node, int], list[fx.Node]]:
    """For each (point, mask): tensors depending on the masked weights (``GraphReads.mask``), defined at or
    before the point, used after it.

    One sweep over the graph keeps the set of live values; a tuple-valued value
    (say, a split) is represented by its tensor inputs, which is what must be
    materialised for its later projections to stop depending on the weights.
    """
    order = analysis.order
    last_use = {node: max((order[user] for user in node.users), default=-1) for node in graph.nodes}
    live: set[fx.Node] = set()
    result: dict[tuple[fx.Node, int], list[fx.Node]] = {}
    for node in graph.nodes:
        position = order[node]
        live = {value for value in live if last_use[value] > position}
        if last_use[node] > position and node.op != "placeholder":
            live.add(node)
        for mask in points.get(node, ()):
            chosen: dict[fx.Node, None] = {}
            for value in sorted(live, key=order.__getitem__):
                if analysis.depends_on[value] & mask:
                    for tensor in _tensor_roots(value, mask, analysis):
                        chosen[tensor] = None
            result[(node, mask)] = list(chosen)
    return result


def _tensor_roots(node: fx.Node, mask: int, analysis: GraphReads) -> list[fx.Node]:
    if isinstance(node_value(node), torch.Tensor):
        return [node]
    roots: list[fx.Node] = []
    for source in node.all_input_nodes:
        if analysis.depends_on[source] & mask and source.op != "placeholder":
            roots.extend(_tensor_roots(source, mask, analysis))
    return roots


def _record(
    by_offload: dict[int, OffloadReads],
    reads: dict[fx.Node, list[tuple[int, str, str]]],
    read_params: dict[fx.Node, dict[ParamInput, None]],
    node: fx.Node,
    info: ParamInput,
    how: str,
) -> None:
    entry = (info.offload_index, info.name, how)
    node_reads = reads.setdefault(node, [])
    if entry not in node_reads:
        node_reads.append(entry)
    read_params.setdefault(node, {})[info] = None
    entry = by_offload[info.offload_index]
    entry.readers.setdefault(node, how)
    piece = entry.pieces[info.piece]  # nodes come in graph order: the first record is the first read
    if piece.first is None:
        piece.first = node
    piece.last = node


def _aliased_param(
    node: fx.Node, inputs: list[fx.Node], param_of: dict[fx.Node, ParamInput], slot_storages: set[object]
) -> ParamInput | None:
    """If ``node`` is a view of an offloaded parameter, that parameter (found through fake storages)."""
    storage = _storage(node)
    if storage is None or storage not in slot_storages:
        return None
    for source in inputs:
        if source in param_of:
            return param_of[source]
    return None


def _storage(node: fx.Node) -> object | None:
    value = node_value(node)
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return StorageWeakRef(value.untyped_storage())
    except (RuntimeError, NotImplementedError):
        return None
