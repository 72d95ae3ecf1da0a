"""A picture of the overlap: compute-stream kernels and copy-stream layer copies, as two lanes.

``export_trace`` profiles one call into a Chrome/Perfetto JSON trace;
``draw_timeline`` reads the trace's kernels and host-to-device copies back and
draws one lane per stream.

Copies are labelled with their layer from what the runtime recorded while the
trace ran (``runtime.start_recording()``: the recorder's ``memcpys``, each
host-to-device memcpy the runtime issued, with its offload index and bytes, a
CUDA graph replay's captured ones included), not from a ``record_function`` per
copy (time on the hot path, and gone inside graph replays) nor from byte sizes
(chunked copies, and blocks of equal size, make those ambiguous). Memcpys issued
on one stream run in issue order, so the trace's host-to-device copies are
matched to the recorded ones in order; a copy that is not the next recorded one
(an input moved to the device) gets no label. :func:`export_trace` lets the
copies queued before the traced call finish before it starts, so the trace holds
the call's own copies only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

if TYPE_CHECKING:
    from .runtime import PrefetchRuntime

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
        torch.cuda.synchronize()  # copies queued earlier (the last call's prefetches) stay out of the trace
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


def label_copies(copy_bytes: Sequence[int], recorded: Sequence[tuple[str, int]]) -> list[str | None]:
    """The layer name of each host-to-device copy of a trace, given the ``(layer name, bytes)`` memcpys recorded.

    Both are in issue order; a trace copy is the next recorded memcpy when its byte
    count is that memcpy's, and is labelled None (not a layer's) otherwise.
    """
    labels: list[str | None] = []
    upcoming = iter(recorded)
    expected = next(upcoming, None)
    for nbytes in copy_bytes:
        if expected is not None and nbytes == expected[1]:
            labels.append(expected[0])
            expected = next(upcoming, None)
        else:
            labels.append(None)
    return labels


def recorded_copies(runtime: PrefetchRuntime) -> list[tuple[str, int]]:
    """``(layer name, bytes)`` of each memcpy the runtime's recorder saw (start it before the traced call)."""
    if runtime.recorder is None:
        raise RuntimeError("nothing recorded: call runtime.start_recording() before the call to trace")
    return [(runtime.offloaded[index].name, nbytes) for index, nbytes in runtime.recorder.memcpys]


def draw_timeline(
    trace_json_path: str | Path, png_path: str | Path, recorded: Sequence[tuple[str, int]] | None = None
) -> list[str | None]:
    """Draw the compute stream and the copy stream(s) of a trace as lanes; return the copies' labels.

    The compute stream is the one with the most kernel time; every stream that
    carries a host-to-device copy gets a lane too. Copies are labelled with
    their layer when the ``recorded`` memcpys are given (:func:`recorded_copies`,
    :func:`label_copies`; copies of no layer are grey), with their size otherwise.
    """
    from matplotlib.figure import Figure  # optional dependency: only drawing needs it

    events = read_gpu_events(trace_json_path)
    copies = [event for event in events if event.kind == COPY]
    labels = label_copies([copy.nbytes for copy in copies], recorded) if recorded is not None else [None] * len(copies)
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
        if recorded is not None and label is None:  # a copy of no layer (an input, say)
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
