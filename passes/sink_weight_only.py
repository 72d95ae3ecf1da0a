"""Move weight-only work next to its first consumer, so that layers' reads do not interleave for no reason.

Dynamo and AOT often emit the views and transposes of all weights up front
(diffusers' transformers do: every block's ``permute`` of its projection
weights sits at the top of the graph). Read literally, every layer would then
be read from the start of the graph, and two layers that share a slot would
look interleaved. Such nodes compute nothing that depends on activations, so
they can run anywhere before their first consumer; putting them right there
leaves only real interleaving (compute that needs two layers' weights at once)
for the slot-conflict check to refuse.

Before::

    t_3 = aten.t(layers_1_weight)          # layer 1, read at the top
    mm_0 = aten.mm(x, t_0)                 # layer 0
    ...
    mm_1 = aten.mm(h, t_3)                 # layer 1

After::

    mm_0 = aten.mm(x, t_0)
    ...
    t_3 = aten.t(layers_1_weight)
    mm_1 = aten.mm(h, t_3)
"""

from __future__ import annotations

from torch import fx


def sink_weight_only_work(graph: fx.Graph, static_inputs: set[fx.Node]) -> int:
    """Move each pure node whose inputs are all weights (or other such nodes) before its first user.

    Returns how many nodes moved. Nodes are visited last to first, so a chain of
    such nodes (a view of a transpose of a weight) sinks as a whole.
    """
    nodes = list(graph.nodes)
    weight_only: set[fx.Node] = set(static_inputs)
    for node in nodes:
        if node.op == "get_attr":
            weight_only.add(node)
        elif (
            node.op == "call_function"
            and node.all_input_nodes
            and all(source in weight_only for source in node.all_input_nodes)
            and not node.is_impure()
        ):
            weight_only.add(node)
    # Positions as floats: a moved node takes a position just before its first user, after
    # the nodes moved there earlier, which is where ``prepend`` puts it.
    position = {node: float(index) for index, node in enumerate(nodes)}
    moved = 0
    for node in reversed(nodes):
        if node.op != "call_function" or node not in weight_only or not node.users:
            continue
        first_user = min(node.users, key=position.__getitem__)
        if node.next is not first_user:
            first_user.prepend(node)
            moved += 1
            position[node] = position[first_user] - 0.5 + moved * 1e-9
    return moved
