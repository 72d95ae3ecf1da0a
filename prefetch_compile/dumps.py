"""Readable dumps of each compiled graph, before and after the prefetch pass, and of the plan.

For graph ``i`` the dump directory receives ``graph_<i>_before.py`` and
``graph_<i>_after.py`` (FX's Python code of the graph) and
``graph_<i>_plan.txt``. In the after file, a comment line above each node that
reads offloaded weights names the layer, its offload index and slot, the
parameters and how they are read, and a comment above each inserted op says
which layer it waits for or prefetches and why it stands there: enough to check
the pass by reading, without a debugger.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import fx, nn

from . import _torch_internals
from .passes import PrefetchPassResult
from .plan import LayerPlan
from .plan_table import plan_rows, prefetch_spans, render_plan_table
from .runtime import PrefetchRuntime

# The line FX emits for a node: "    <name> = <target>(...)".
_ASSIGNMENT = re.compile(r"^(\s+)([A-Za-z_]\w*) = ")


def emit_graph_dump(
    dump_dir: Path | None, graph_name: str, before: str, graph: fx.Graph, result: PrefetchPassResult, runtime: PrefetchRuntime
) -> None:
    """Write the three files of one graph to ``dump_dir`` (when given), and put them into PyTorch's structured trace.

    ``graph_name`` is Dynamo's compile id (``frame/recompile``, as ``TORCH_LOGS`` and
    tlparse print it); the files are ``graph_<frame>_<recompile>_{before.py,after.py,plan.txt}``.
    ``before`` is the graph's code captured before the pass ran (empty without a dump dir).
    """
    def after() -> str:
        return annotated_code(graph, result, runtime.offloaded, graph_name)

    def plan() -> str:
        params = {**_parameters(runtime.kept_tensors), **runtime.offloaded_params}
        table = render_plan_table(plan_rows(runtime.plan, params, prefetch_spans(graph, result)))
        return (
            f"graph {graph_name}: the plan, and where this graph prefetches each layer "
            f"(FLOPs estimated from matmul-like ops)\n\n{table}\n"
        )

    stem = "graph_" + graph_name.replace("/", "_")
    _torch_internals.emit_artifact(f"prefetch_compile_{stem}_after", after)
    if dump_dir is None:
        return
    dump_dir.mkdir(parents=True, exist_ok=True)
    for suffix, text in {"before.py": before, "after.py": after(), "plan.txt": plan()}.items():
        (dump_dir / f"{stem}_{suffix}").write_text(text)


def annotated_code(graph: fx.Graph, result: PrefetchPassResult, offloaded: Sequence[LayerPlan], graph_name: str) -> str:
    """FX's Python code of ``graph`` with a comment line above every node that reads or moves offloaded weights.

    ``offloaded`` are the plan's offloaded layers, by offload index (``plan.offloaded``).
    """
    notes = node_notes(result, offloaded)
    lines = [
        f"# graph {graph_name} (Dynamo compile id) after the prefetch pass.",
        "# '# reads' lines: the offloaded layer (offload index, slot), its parameters, and how each is read.",
        "# '# wait for' / '# prefetch' lines: the inserted ops and why they stand there.",
        "# Layer names are those the graph was compiled for; the ops find their layer from the weights at run time.",
    ]
    for line in graph.python_code("self").src.splitlines():
        match = _ASSIGNMENT.match(line)
        if match and match.group(2) in notes:
            lines.extend(f"{match.group(1)}# {note}" for note in notes[match.group(2)])
        lines.append(line)
    return "\n".join(lines) + "\n"


def node_notes(result: PrefetchPassResult, offloaded: Sequence[LayerPlan]) -> dict[str, list[str]]:
    """The comment lines for each node name: what it reads, or what the inserted op does and why there."""
    notes: dict[str, list[str]] = {}
    for node, reads in result.analysis.reads.items():
        by_offload: dict[int, list[str]] = {}
        for offload_index, name, how in reads:
            by_offload.setdefault(offload_index, []).append(f"{name} ({how})")
        for offload_index, params in by_offload.items():
            notes.setdefault(node.name, []).append(f"reads {_describe(offloaded[offload_index])}: {', '.join(params)}")
    for op in result.inserted:
        action = "wait for" if op.kind == "wait" else "prefetch"
        notes.setdefault(op.node.name, []).append(f"{action} {_describe(offloaded[op.offload_index])}; why here: {op.reason}")
    return notes


def _describe(layer: LayerPlan) -> str:
    return f"{layer.name} (offload {layer.offload_index}, slot {layer.slot})"


def _parameters(tensors: Mapping[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    """The parameters among a runtime's kept tensors (the rest are buffers)."""
    return {name: tensor for name, tensor in tensors.items() if isinstance(tensor, nn.Parameter)}
