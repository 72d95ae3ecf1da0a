"""The overlap picture: reading a Kineto trace, naming each copy's layer, drawing the lanes (all on CPU)."""

from __future__ import annotations

import json

import pytest
import torch

import prefetch_compile
from prefetch_compile.timeline import (
    COPY,
    KERNEL,
    draw_timeline,
    export_trace,
    label_copies,
    read_gpu_events,
    recorded_copies,
)
from toy_models import Stack

INPUT_BYTES = 96  # an activation copied in: no layer's block is this small


def write_trace(path, copy_bytes, compute_stream=7, copy_stream=13):
    """A Kineto-like trace: a kernel between every two copies, plus events that must be ignored."""
    events = [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1, "ts": 0, "dur": 500}]
    for index, nbytes in enumerate(copy_bytes):
        start = 100 + 40 * index
        events.append(
            {"ph": "X", "cat": "kernel", "name": "gemm", "pid": 0, "tid": compute_stream, "ts": start, "dur": 30,
             "args": {"device": 0, "stream": compute_stream}}
        )
        events.append(
            {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "pid": 0, "tid": copy_stream,
             "ts": start + 5, "dur": 20, "args": {"device": 0, "stream": copy_stream, "bytes": nbytes}}
        )
    events.append(
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pageable)", "pid": 0, "tid": compute_stream,
         "ts": 900, "dur": 3, "args": {"device": 0, "stream": compute_stream, "bytes": 16}}
    )
    path.write_text(json.dumps({"traceEvents": events}))
    return path


def recorded_forward(chunked: bool) -> tuple[list[tuple[str, int]], object]:
    """What the recorder saw in one steady forward of four blocks offloaded through one slot."""
    model = Stack(["linear"] * 4)
    runtime = prefetch_compile.offload(model, "cpu", group_size=1, prefetch_step=1, chunked_copies=chunked)
    compiled = torch.compile(model, backend="prefetch_offload", options={"compiler": "aot_eager"})
    with torch.no_grad():
        compiled(torch.randn(2, 16))
        runtime.start_recording()
        compiled(torch.randn(2, 16))
    return recorded_copies(runtime), runtime


def test_the_recorder_names_every_memcpy_of_a_forward_in_issue_order():
    """One slot: layers 1, 2, 3 come in during the forward and layer 0 for the next one, each once."""
    recorded, runtime = recorded_forward(chunked=False)
    assert recorded == [(f"layers.{i}", runtime.offloaded[i].nbytes) for i in (1, 2, 3, 0)]


def test_chunked_copies_are_named_chunk_by_chunk():
    """Three pieces per block (weight, bias, gain): one memcpy per chunk, all of a layer's bytes once."""
    recorded, runtime = recorded_forward(chunked=True)
    names = [name for name, _ in recorded]
    assert names == [name for i in (1, 2, 3, 0) for name in [f"layers.{i}"] * 3]
    for i in range(4):
        assert sum(n for name, n in recorded if name == f"layers.{i}") == runtime.offloaded[i].nbytes


def test_label_copies_matches_recorded_memcpys_in_order_and_skips_other_copies():
    recorded = [("layers.1", 64), ("layers.1", 32), ("layers.2", 64), ("layers.2", 32)]
    observed = [INPUT_BYTES, 64, 32, 64, INPUT_BYTES, 32, 64]
    assert label_copies(observed, recorded) == [None, "layers.1", "layers.1", "layers.2", None, "layers.2", None]


def test_draw_timeline_from_a_synthetic_trace_and_a_real_recording(tmp_path):
    pytest.importorskip("matplotlib")
    recorded, _ = recorded_forward(chunked=True)
    sizes = [nbytes for _, nbytes in recorded]
    trace = write_trace(tmp_path / "trace.json", [INPUT_BYTES, *sizes])

    events = read_gpu_events(trace)
    assert [event.kind for event in events].count(KERNEL) == len(sizes) + 1
    assert [event.stream for event in events if event.kind == COPY] == [13] * (len(sizes) + 1)  # not the DtoH one

    png = tmp_path / "timeline.png"
    labels = draw_timeline(trace, png, recorded)
    assert png.read_bytes().startswith(b"\x89PNG")
    assert labels == [None, *(name for name, _ in recorded)]


def test_recorded_copies_needs_a_recording():
    runtime = prefetch_compile.offload(Stack(["linear"] * 4), "cpu", group_size=2)
    runtime.start_recording()
    assert recorded_copies(runtime) == []
    runtime.stop_recording()
    with pytest.raises(RuntimeError, match="start_recording"):
        recorded_copies(runtime)


def test_a_cpu_trace_draws_an_empty_picture(tmp_path):
    pytest.importorskip("matplotlib")
    trace = tmp_path / "cpu.json"
    weight = torch.randn(8, 8)
    export_trace(lambda: weight @ weight, trace)
    if not torch.cuda.is_available():
        assert read_gpu_events(trace) == []
    assert draw_timeline(trace, tmp_path / "cpu.png") is not None
    assert (tmp_path / "cpu.png").exists()
