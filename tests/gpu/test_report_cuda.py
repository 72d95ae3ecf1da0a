"""The copy report and the timeline on a CUDA device: CUDA-event timings, and copies named from the recording."""

from __future__ import annotations

import logging
import re

import pytest
import torch

import prefetch_compile
from prefetch_compile.timeline import COPY, export_trace, label_copies, read_gpu_events, recorded_copies

llama_like = pytest.importorskip("llama_like")

DEVICE = "cuda"


def small_llama(layers: int = 8):
    """About 25 MB per layer in bf16: copies long enough to time."""
    shape = llama_like.LlamaShape(vocab=1024, hidden=1024, intermediate=4096, heads=16, kv_heads=4, layers=layers)
    return llama_like.build(shape, device=DEVICE, dtype=torch.bfloat16, seed=0)


def forwards_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if re.search(r"forwards \d+-\d+ of", record.getMessage())]


def test_the_first_timed_forwards_are_logged_from_cuda_events(caplog):
    model = small_llama()
    compiled = torch.compile(model, backend="prefetch_offload", options={"group_size": 2, "prefetch_step": 1})
    x = torch.randint(0, 1024, (1, 1), device=DEVICE)
    with caplog.at_level(logging.INFO, logger="prefetch_compile"), torch.inference_mode():
        for _ in range(5):
            compiled(x)
        torch.cuda.synchronize()  # forwards 2-4 reached on the device: the next entry logs them
        compiled(x)
    (line,) = forwards_lines(caplog)
    print(line)
    assert "forwards 2-4 of 'layers'" in line
    runtime = prefetch_compile.runtime_of(model)
    report = runtime.report()
    assert report.forwards == 3 and report.misses == 0
    assert report.copied_bytes == 3 * sum(layer.nbytes for layer in runtime.offloaded)
    assert report.bandwidth is not None and report.bandwidth > 1e9  # pinned copies: GB/s, not a wall-clock artefact
    assert report.stall_per_forward > 0  # decode is copy-bound: the compute stream waits for the copies
    assert runtime.recorder is None


def test_cuda_graph_replays_log_no_first_forwards_and_record_nothing(caplog):
    model = small_llama()
    compiled = torch.compile(model, backend="prefetch_offload", options={"group_size": 2, "cuda_graphs": True})
    x = torch.randint(0, 1024, (1, 1), device=DEVICE)
    with caplog.at_level(logging.INFO, logger="prefetch_compile"), torch.inference_mode():
        for _ in range(8):
            compiled(x)
    assert forwards_lines(caplog) == []
    assert prefetch_compile.runtime_of(model).recorder is None  # dropped at the capture: it would only grow


@pytest.mark.parametrize("chunked,graphs", [(False, False), (True, False), (True, True)])
def test_every_copy_of_a_trace_is_named_from_the_recording(tmp_path, chunked, graphs):
    """One warm forward under the profiler: its host-to-device copies, in time order, are exactly the memcpys
    the recorder saw, in issue order (a replay's captured copies and the deferred ones after it included)."""
    model = small_llama()
    runtime = prefetch_compile.offload(model, DEVICE, group_size=2, prefetch_step=1, chunked_copies=chunked)
    compiled = torch.compile(model, backend="prefetch_offload", options={"cuda_graphs": graphs})
    x = torch.randint(0, 1024, (1, 16), device=DEVICE)
    with torch.inference_mode():
        for _ in range(3):  # compile (a graph's warm-up), capture, replay
            compiled(x)
        runtime.start_recording()
        export_trace(lambda: compiled(x), tmp_path / "trace.json")
    recorded = recorded_copies(runtime)
    copies = [event.nbytes for event in read_gpu_events(tmp_path / "trace.json") if event.kind == COPY]
    assert len(recorded) == (4 if not chunked else 16)
    assert label_copies(copies, recorded) == [name for name, _ in recorded]
    assert copies == [nbytes for _, nbytes in recorded]
