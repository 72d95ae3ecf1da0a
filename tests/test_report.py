"""runtime.report(): what the copies did, recorded at the runtime's start and wait."""

from __future__ import annotations

import pytest
import torch

import prefetch_compile
from toy_models import Stack


def test_report_counts_every_copy_and_wait_per_layer():
    model = Stack(["linear"] * 4)
    runtime = prefetch_compile.offload(model, "cpu", group_size=2, prefetch_step=1)
    runtime.start_recording()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, 16))
    report = runtime.report()
    assert report.forwards == 3
    # One slot, two offloaded layers: each forward copies layer 3 after layer 1 and layer 1 (for the next
    # forward) after layer 3.
    assert [(row.name, row.copies, row.waits, row.misses) for row in report.layers] == [
        ("layers.1", 3, 3, 0),
        ("layers.3", 3, 3, 0),
    ]
    assert [row.nbytes for row in report.layers] == [layer.nbytes for layer in runtime.offloaded]
    assert report.copies == 6 and report.misses == 0
    assert report.copied_bytes == 3 * sum(layer.nbytes for layer in runtime.offloaded)
    # Synchronous CPU copies are done before anyone waits: no stall; every copy but the first wait's had a window.
    assert all(row.stall_s < 1e-3 and row.window_s is not None for row in report.layers)
    rendered = report.render(compute_only_s=1.0, measured_s=2.0)
    assert "layers.3" in rendered and "achieved bandwidth" in rendered
    assert report.efficiency(compute_only_s=1.0, measured_s=2.0) == 0.5  # the tiny copies are far below 1 s
    assert "overlap efficiency 0.50" in rendered


def test_report_of_chunked_copies_counts_chunks_and_forwards():
    """Three chunks per layer (fc.weight, fc.bias, gain): three copies and three waits of each layer per forward,
    every byte copied once, and the forwards still counted as forwards."""
    model = Stack(["linear"] * 4)
    runtime = prefetch_compile.offload(model, "cpu", group_size=2, prefetch_step=1, chunked_copies=True)
    compiled = torch.compile(model, backend="prefetch_offload", options={"compiler": "aot_eager"})
    with torch.no_grad():
        compiled(torch.randn(2, 16))
        runtime.start_recording()
        for _ in range(3):
            compiled(torch.randn(2, 16))
    report = runtime.report()
    assert report.forwards == 3
    assert [(row.copies, row.waits, row.misses) for row in report.layers] == [(9, 9, 0), (9, 9, 0)]
    assert report.copied_bytes == 3 * sum(layer.nbytes for layer in runtime.offloaded)
    assert all(row.window_s is not None for row in report.layers)


def test_report_counts_a_wait_nobody_prefetched_as_a_miss():
    model = Stack(["linear"] * 4)
    runtime = prefetch_compile.offload(model, "cpu", group_size=2, prefetch_step=1)
    runtime.start_recording()
    runtime.wait(1)  # slot 0 holds layer 1 (offload index 0) after offload(); offload index 1 was never started
    runtime.wait(0)
    report = runtime.report()
    assert [(row.copies, row.misses) for row in report.layers] == [(1, 1), (1, 1)]


def test_report_needs_recording_first():
    runtime = prefetch_compile.offload(Stack(["linear"] * 2), "cpu", group_size=2)
    with pytest.raises(RuntimeError, match=r"call runtime.start_recording\(\) before the forwards"):
        runtime.report()
