"""The overlap picture: reading a Kineto trace, naming each copy's layer, drawing the lanes (all on CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from prefetch_compile.config import PlanOptions
from prefetch_compile.plan import build_plan
from prefetch_compile.timeline import COPY, KERNEL, draw_timeline, export_trace, label_copies, read_gpu_events
from toy_models import HeterogeneousStack, Stack

INPUT_BYTES = 96  # an activation copied in: no layer's block is this small


def uniform_plan():
    """Four equal blocks, all offloaded through one slot: labels come from order alone."""
    return build_plan(Stack(["linear"] * 4), PlanOptions(group_size=1, prefetch_step=1))


def sized_plan():
    """Four blocks of different byte sizes, two slots."""
    return build_plan(HeterogeneousStack([8, 16, 32, 64, 128]), PlanOptions(group_size=1, prefetch_step=2))


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


def test_steady_state_copies_are_labelled_in_offload_order_from_num_slots():
    plan = uniform_plan()
    nbytes = plan.offloaded[0].nbytes
    labels = label_copies([INPUT_BYTES, nbytes, nbytes, nbytes, nbytes], plan)
    assert labels == [None, "layers.1", "layers.2", "layers.3", "layers.0"]


def test_block_sizes_fix_where_in_the_cycle_the_trace_starts():
    plan = sized_plan()
    sizes = [layer.nbytes for layer in plan.offloaded]
    assert len(set(sizes)) == len(sizes)
    observed = [sizes[3], INPUT_BYTES, sizes[0], sizes[1]]
    assert label_copies(observed, plan) == ["layers.3", None, "layers.0", "layers.1"]


def test_draw_timeline_from_a_synthetic_trace(tmp_path):
    pytest.importorskip("matplotlib")
    plan = sized_plan()
    sizes = [layer.nbytes for layer in plan.offloaded]
    trace = write_trace(tmp_path / "trace.json", [sizes[2], sizes[3], INPUT_BYTES, sizes[0], sizes[1]])

    events = read_gpu_events(trace)
    assert [event.kind for event in events].count(KERNEL) == 5
    assert [event.stream for event in events if event.kind == COPY] == [13] * 5  # the DtoH copy is not one

    png = tmp_path / "timeline.png"
    labels = draw_timeline(trace, png, plan)
    assert png.read_bytes().startswith(b"\x89PNG")
    assert labels == ["layers.2", "layers.3", None, "layers.0", "layers.1"]


def test_a_cpu_trace_draws_an_empty_picture(tmp_path):
    pytest.importorskip("matplotlib")
    trace = tmp_path / "cpu.json"
    weight = torch.randn(8, 8)
    export_trace(lambda: weight @ weight, trace)
    if not torch.cuda.is_available():
        assert read_gpu_events(trace) == []
    assert draw_timeline(trace, tmp_path / "cpu.png") is not None
    assert (tmp_path / "cpu.png").exists()
