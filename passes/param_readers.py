"""Which nodes of an FX graph read the weights of which offload index.

A node *reads* offload index L when it consumes one of L's parameters, a view of one,
or the result of weight-only work on them (a cast, a dequantisation, a
transposed copy: nodes whose inputs are all parameters or constants). Such
weight-only results can be fused by Inductor into their consumers, which then
read the slot directly, so their consumers count as readers too.

The analysis also finds, for any point of the graph, the values computed from
L that are still needed after it ("live"): the prefetch that overwrites L's slot
takes them as inputs so they are materialised before the copy.

Works on both Dynamo's torch-level graphs and AOT's ATen-level graphs: it
relies only on graph structure and on the fake tensors in ``node.meta``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class OffloadReads:
    """Everything the pass needs to know about one offload index inside one graph."""

    offload_index: int
    params: list[fx.Node] = field(default_factory=list)  # its parameter placeholders
    readers: dict[fx.Node, str] = field(default_factory=dict)  # node -> how it reads (READ_*)
    first: fx.Node | None = None
    last: fx.Node | None = None


@dataclass
class GraphReads:
    """The result of :func:`analyze_param_reads`."""

    offloaded: dict[int, OffloadReads]  # by offload index
    order: dict[fx.Node, int]
    depends_on: dict[fx.Node, int]  # bitmask over offload indices: whose weights flowed into the node
    reads: dict[fx.Node, list[tuple[int, str, str]]]  # node -> [(offload index, parameter name, how)] for annotation


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
    reads: dict[fx.Node, list[tuple[int, str, str]]] = {}

    for node in nodes:
        inputs = node.all_input_nodes
        if node.op == "placeholder":
            info = param_inputs.get(node)
            depends_on[node] = 1 << info.offload_index if info else 0
            is_static[node] = node in static_inputs
            if info:
                param_of[node] = info
                by_offload[info.offload_index].params.append(node)
            continue
        depends_on[node] = 0
        for source in inputs:
            depends_on[node] |= depends_on[source]
        is_static[node] = node.op == "get_attr" or (bool(inputs) and all(is_static[s] for s in inputs))

        for source in inputs:
            if source in param_of:
                how = READ_DIRECT if source.op == "placeholder" else READ_VIEW
                _record(by_offload, reads, node, param_of[source], how)
            elif is_static[source] and depends_on[source] and source.op != "placeholder":
                for offload_index, name, _ in reads.get(source, ()):
                    how = READ_WEIGHT_ONLY if is_static[node] else READ_CONSUMER
                    _record(by_offload, reads, node, ParamInput(offload_index, name), how)

        aliased = _aliased_param(node, inputs, param_of, slot_storages)
        if aliased is not None:
            param_of[node] = aliased

    for entry in by_offload.values():
        if entry.readers:
            entry.first = min(entry.readers, key=order.__getitem__)
            entry.last = max(entry.readers, key=order.__getitem__)
    return GraphReads(by_offload, order, depends_on, reads)


def live_after(graph: fx.Graph, analysis: GraphReads, points: dict[fx.Node, list[int]]) -> dict[tuple[fx.Node, int], list[fx.Node]]:
    """For each (point, offload index): tensors computed from its weights, defined at or before the point, used after it.

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
        for offload_index in points.get(node, ()):
            bit = 1 << offload_index
            chosen: dict[fx.Node, None] = {}
            for value in sorted(live, key=order.__getitem__):
                if analysis.depends_on[value] & bit:
                    for tensor in _tensor_roots(value, bit, analysis):
                        chosen[tensor] = None
            result[(node, offload_index)] = list(chosen)
    return result


def _tensor_roots(node: fx.Node, bit: int, analysis: GraphReads) -> list[fx.Node]:
    if isinstance(node_value(node), torch.Tensor):
        return [node]
    roots: list[fx.Node] = []
    for source in node.all_input_nodes:
        if analysis.depends_on[source] & bit and source.op != "placeholder":
            roots.extend(_tensor_roots(source, bit, analysis))
    return roots


def _record(
    by_offload: dict[int, OffloadReads],
    reads: dict[fx.Node, list[tuple[int, str, str]]],
    node: fx.Node,
    info: ParamInput,
    how: str,
) -> None:
    entry = (info.offload_index, info.name, how)
    node_reads = reads.setdefault(node, [])
    if entry not in node_reads:
        node_reads.append(entry)
    by_offload[info.offload_index].readers.setdefault(node, how)


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
