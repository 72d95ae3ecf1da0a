"""The plan as a table: what each layer holds, where it goes, and how much work hides its copy.

``plan_rows`` is pure data (one dict per layer, exact byte counts) so tests
and the command line read the same numbers the dumps print; the ``render_*``
functions only format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from tabulate import tabulate
from torch import fx

from .flops import estimate_flops
from .leaves import leaf_bytes, tensor_leaves
from .passes import PrefetchPassResult
from .plan import OffloadPlan
from .runtime import format_bytes

NOT_IN_GRAPH = "-"


@dataclass(frozen=True)
class PrefetchSpan:
    """Where, in one graph, a layer's copy is started and where it is waited for, and the work between."""

    start: str  # the start_prefetch node, or NOT_IN_GRAPH
    wait: str  # the wait_prefetch node, or NOT_IN_GRAPH
    for_next_call: bool  # the start stands after the wait: it prefetches for the graph's next run
    nodes: int | None  # compute nodes between the two (around the end of the graph when for_next_call)
    flops: int | None  # estimated FLOPs of those nodes; None when an end is missing or a shape is symbolic


def prefetch_spans(graph: fx.Graph, result: PrefetchPassResult) -> dict[int, PrefetchSpan]:
    """The span of every offloaded layer that the pass waited for or prefetched in ``graph``, by offload index.

    A layer copied in chunks has several starts and waits: its span runs from the first start to the first wait.
    """
    inserted = {op.node for op in result.inserted}
    nodes = list(graph.nodes)
    position = {node: index for index, node in enumerate(nodes)}
    starts: dict[int, fx.Node] = {}
    waits: dict[int, fx.Node] = {}
    for op in sorted(result.inserted, key=lambda op: position[op.node]):
        (starts if op.kind == "start" else waits).setdefault(op.offload_index, op.node)
    spans = {}
    for offload_index in starts.keys() | waits.keys():
        start, wait = starts.get(offload_index), waits.get(offload_index)
        if start is None or wait is None:
            between = None
        elif position[start] < position[wait]:
            between = nodes[position[start] + 1 : position[wait]]
        else:
            between = nodes[position[start] + 1 :] + nodes[: position[wait]]
        work = None if between is None else [node for node in between if _is_compute(node, inserted)]
        flops = None if work is None else [estimate_flops(node) for node in work]
        spans[offload_index] = PrefetchSpan(
            start=start.name if start is not None else NOT_IN_GRAPH,
            wait=wait.name if wait is not None else NOT_IN_GRAPH,
            for_next_call=between is not None and position[start] > position[wait],
            nodes=None if work is None else len(work),
            flops=None if flops is None or None in flops else sum(flops),
        )
    return spans


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def plan_rows(
    plan: OffloadPlan, params: Mapping[str, torch.Tensor], spans: Mapping[int, PrefetchSpan] | None = None
) -> list[dict[str, object]]:
    """One row per layer of the plan; with ``spans`` (one graph's), also where its prefetch runs.

    ``params`` are the model's parameters by dotted name (``model.named_parameters()``),
    offloaded or not: the plan itself records only the offloaded ones.
    """
    rows = []
    for layer in plan.layers:
        own = [tensor for name, tensor in params.items() if name.startswith(f"{layer.name}.")]
        row: dict[str, object] = {
            "layer": layer.name,
            "placement": _placement(layer.offloaded, layer.kept_param_bytes),
            "params": len(own),
            "bytes": sum(leaf_bytes(tensor) for tensor in own),  # what is stored (a quantized weight's leaves)
            "offloaded bytes": sum(placement.nbytes for placement in layer.params),
            # Those stored, as "bytes" counts them: a torchao int8 weight is int8 values and float32 scales.
            "dtypes": ",".join(sorted({_dtype_name(leaf) for tensor in own for _, leaf in tensor_leaves(tensor)})),
            "offload #": layer.offload_index,
            "slot": layer.slot,
        }
        if spans is not None:
            span = spans.get(layer.offload_index) if layer.offloaded else None
            row["prefetch starts at"] = _start_cell(span)
            row["waited for at"] = span.wait if span else NOT_IN_GRAPH
            row["nodes between"] = span.nodes if span else None
            row["estimated FLOPs between"] = span.flops if span else None
        rows.append(row)
    return rows


def render_plan_table(rows: Sequence[Mapping[str, object]]) -> str:
    """The rows as a text table: exact bytes with thousands separators, FLOPs with SI prefixes."""
    return tabulate([{key: _cell(key, value) for key, value in row.items()} for row in rows], headers="keys")


def plan_summary(plan: OffloadPlan) -> dict[str, int | str]:
    """The plan's totals: what leaves the device, what the slots cost, what is saved."""
    offloaded = plan.offloaded_bytes()
    slot_pool = sum(plan.slot_bytes())
    return {
        "layers offloaded": f"{len(plan.offloaded)}/{len(plan.layers)} of '{plan.layer_list_path}'",
        "bytes moved to host": offloaded,
        "slot pool bytes": slot_pool,
        "device bytes saved": offloaded - slot_pool,
    }


def render_summary(summary: Mapping[str, int | str]) -> str:
    return tabulate(
        [(key, f"{value:,} ({format_bytes(value)})" if isinstance(value, int) else value) for key, value in summary.items()],
        tablefmt="plain",
        disable_numparse=True,
    )


def _is_compute(node: fx.Node, inserted: set[fx.Node]) -> bool:
    return node.op in ("call_function", "call_method", "call_module") and node not in inserted


def _placement(offloaded: bool, kept_param_bytes: int) -> str:
    if not offloaded:
        return "kept"
    return "partly offloaded" if kept_param_bytes else "offloaded"


def _start_cell(span: PrefetchSpan | None) -> str:
    if span is None:
        return NOT_IN_GRAPH
    return f"{span.start} (next call)" if span.for_next_call else span.start


def _cell(key: str, value: object) -> object:
    if value is None:
        return NOT_IN_GRAPH
    if isinstance(value, int) and "FLOPs" in key:
        return _si(value)
    if isinstance(value, int) and "bytes" in key:
        return f"{value:,}"
    return value


def _si(value: int) -> str:
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{prefix}"
    return str(value)
