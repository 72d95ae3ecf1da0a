"""A picture of the overlap: compute-stream kernels and copy-stream layer copies, as two lanes.

``export_trace`` profiles one call into a Chrome/Perfetto JSON trace;
``draw_timeline`` reads the trace's kernels and host-to-device copies back and
draws one lane per stream.

Copies are labelled with their layer without touching the hot path (no
``record_function`` per copy, which would cost time and vanish inside CUDA
graph replays). Instead :func:`label_copies` relies on two facts of the
runtime: each layer travels as exactly one copy of ``layer.nbytes`` bytes, and
copies are issued in offload order, cyclically (after layer i's last read comes
layer ``next_in_slot(i)``, and every forward ends by bringing in the first
layers again). Copies of a size no layer has (inputs, say) get no label; the
position in the cycle is the one whose block sizes fit the observed sizes best,
and among equally good ones the steady state of a model that already ran
once: the first copy of a forward brings in offload index ``num_slots``. A
model that re-reads a layer out of order (a layer split by a graph break is
copied again where it is needed) shifts the labels after that copy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .plan import OffloadPlan

KERNEL, COPY = "kernel", "copy"


@dataclass(frozen=True)
class GpuEvent:
    """One kernel or host-to-device copy of a trace, in microseconds."""

    kind: str  # KERNEL or COPY
    stream: int
    start: float
    duration: float
    nbytes: int  # copies only


def export_trace(fn: Callable[[], object], path: str | Path) -> None:
    """Run ``fn()`` once under torch.profiler and write its Chrome/Perfetto trace to ``path``.

    Warm up first (compile, a forward or two): the trace should show the steady state.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    profiler.export_chrome_trace(str(path))


def read_gpu_events(trace_json_path: str | Path) -> list[GpuEvent]:
    """Kernels and host-to-device copies of a Kineto trace, in time order."""
    events = []
    for event in json.loads(Path(trace_json_path).read_text()).get("traceEvents", []):
        category, args = event.get("cat"), event.get("args", {})
        if category == KERNEL:
            kind = KERNEL
        elif category == "gpu_memcpy" and "HtoD" in event.get("name", ""):
            kind = COPY
        else:
            continue
        stream = int(args.get("stream", event.get("tid", 0)))
        events.append(GpuEvent(kind, stream, float(event["ts"]), float(event["dur"]), int(args.get("bytes", 0))))
    return sorted(events, key=lambda event: event.start)


def label_copies(copy_bytes: Sequence[int], plan: OffloadPlan) -> list[str | None]:
    """The layer name of each host-to-device copy, in issue order (None for a copy that is no layer's)."""
    layers = plan.offloaded
    if not layers:
        return [None] * len(copy_bytes)
    block_sizes = {layer.nbytes for layer in layers}
    ours = [index for index, nbytes in enumerate(copy_bytes) if nbytes in block_sizes]

    def fit(phase: int) -> tuple[int, bool]:
        matches = sum(copy_bytes[index] == layers[(phase + rank) % len(layers)].nbytes for rank, index in enumerate(ours))
        return matches, phase == plan.num_slots % len(layers)

    phase = max(range(len(layers)), key=fit)
    labels: list[str | None] = [None] * len(copy_bytes)
    for rank, index in enumerate(ours):
        labels[index] = layers[(phase + rank) % len(layers)].name
    return labels


def draw_timeline(trace_json_path: str | Path, png_path: str | Path, plan: OffloadPlan | None = None) -> list[str | None]:
    """Draw the compute stream and the copy stream(s) of a trace as lanes; return the copies' labels.

    The compute stream is the one with the most kernel time; every stream that
    carries a host-to-device copy gets a lane too. Copies are labelled with
    their layer when ``plan`` is given (see :func:`label_copies`; copies of no
    layer are grey), with their size otherwise.
    """
    from matplotlib.figure import Figure  # optional dependency: only drawing needs it

    events = read_gpu_events(trace_json_path)
    copies = [event for event in events if event.kind == COPY]
    labels = label_copies([copy.nbytes for copy in copies], plan) if plan is not None else [None] * len(copies)
    lanes = _lanes(events)
    origin = min((event.start for event in events), default=0.0)

    figure = Figure(figsize=(14, 1.2 + 0.9 * max(len(lanes), 1)))
    axes = figure.subplots()
    rows = {stream: row for row, (stream, _) in enumerate(lanes)}
    bars: dict[tuple[int, str], list[tuple[float, float]]] = {}

    def add(event: GpuEvent, color: str) -> None:
        bars.setdefault((rows[event.stream], color), []).append(((event.start - origin) / 1e3, event.duration / 1e3))

    for event in events:
        if event.kind == KERNEL and event.stream in rows:
            add(event, "tab:blue")
    for copy, label in zip(copies, labels):
        if plan is not None and label is None:  # a copy of no layer (an input, say)
            add(copy, "tab:gray")
            continue
        add(copy, "tab:orange")
        middle = (copy.start - origin + copy.duration / 2) / 1e3
        text = label or f"{copy.nbytes / 2**20:.1f} MiB"
        axes.text(middle, rows[copy.stream], text, ha="center", va="center", fontsize=7, rotation=90)
    for (row, color), spans in bars.items():
        axes.broken_barh(spans, (row - 0.4, 0.8), color=color)
    axes.set_yticks(range(len(lanes)), [title for _, title in lanes])
    axes.set_ylim(-0.6, max(len(lanes), 1) - 0.4)
    axes.set_xlabel("time (ms)")
    if not events:
        axes.text(0.5, 0.5, "no GPU kernels or host-to-device copies in this trace", ha="center", transform=axes.transAxes)
    axes.set_title("prefetch overlap: kernels (blue) on the compute stream, layer copies (orange) on the copy stream")
    figure.tight_layout()
    figure.savefig(png_path, dpi=150)
    return labels


def _lanes(events: list[GpuEvent]) -> list[tuple[int, str]]:
    """(stream, title) of each lane: the busiest kernel stream first, then the streams that copy."""
    kernel_time: dict[int, float] = {}
    for event in events:
        if event.kind == KERNEL:
            kernel_time[event.stream] = kernel_time.get(event.stream, 0.0) + event.duration
    lanes = []
    if kernel_time:
        compute = max(kernel_time, key=kernel_time.__getitem__)
        lanes.append((compute, f"compute (stream {compute})"))
    for event in events:
        if event.kind == COPY and event.stream not in [stream for stream, _ in lanes]:
            lanes.append((event.stream, f"copy (stream {event.stream})"))
    return lanes
