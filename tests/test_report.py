"""runtime.report(): what the copies did, recorded at the runtime's start and wait."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import pytest
import torch

import prefetch_compile
from toy_models import Stack

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import llama_like  # noqa: E402  (examples/llama_like.py)


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


def test_report_of_blocks_compiled_one_by_one_counts_forwards_not_waits():
    """A block compiled on its own waits for its layer twice per call, in its graph and in its eager hook:
    the second wait finds the layer in and stalls for nothing, and must not count as another forward."""
    model = llama_like.build(llama_like.tiny_shape(4), "cpu", torch.float32, seed=0)
    runtime = prefetch_compile.offload(model, "cpu", group_size=1, prefetch_step=2)
    for block in model.layers:
        block.compile(backend="prefetch_offload", options={"compiler": "aot_eager"}, dynamic=False)
    tokens = llama_like.sample_tokens(model.shape, 1, 4, seed=0)
    with torch.no_grad():
        model(tokens)
        runtime.start_recording()
        for _ in range(3):
            model(tokens)
    report = runtime.report()
    assert [(row.copies, row.waits) for row in report.layers] == [(3, 6)] * 4
    assert report.forwards == 3
    assert report.stall_per_forward == sum(row.stall_s for row in report.layers)


def test_report_counts_the_forwards_of_a_single_offloaded_layer():
    model = Stack(["linear"] * 2)
    runtime = prefetch_compile.offload(model, "cpu", group_size=2, prefetch_step=1)
    runtime.start_recording()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(2, 16))
    report = runtime.report()
    assert len(report.layers) == 1 and report.forwards == 4


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


def _forwards_line(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if re.search(r"forwards \d+-\d+ of", record.getMessage())]


def test_the_first_timed_forwards_are_logged_in_one_line_without_start_recording(caplog):
    """The README's one line and nothing else: forwards 2-4 (the first compiles) are summed up in one INFO line
    once forward 5 has begun, and runtime.report() returns that report."""
    model = Stack(["linear"] * 4)
    compiled = torch.compile(model, backend="prefetch_offload", options={"group_size": 2, "compiler": "aot_eager"})
    with caplog.at_level(logging.INFO, logger="prefetch_compile"), torch.no_grad():
        for _ in range(4):
            compiled(torch.randn(2, 16))
        runtime = prefetch_compile.runtime_of(model)
        assert _forwards_line(caplog) == []
        with pytest.raises(RuntimeError, match="covers the first timed forwards once the one after them has begun"):
            runtime.report()
        compiled(torch.randn(2, 16))
        compiled(torch.randn(2, 16))
    (line,) = _forwards_line(caplog)
    assert "forwards 2-4 of 'layers': 3 forwards, 6 copies" in line and "ensure-path misses 0" in line
    report = runtime.report()
    assert report.forwards == 3 and report.copies == 6 and report.misses == 0
    assert report.copied_bytes == 3 * sum(layer.nbytes for layer in runtime.offloaded)
    assert runtime.recorder is None  # nothing is recorded after the logged forwards


def test_start_recording_replaces_the_first_forwards_log(caplog):
    model = Stack(["linear"] * 4)
    runtime = prefetch_compile.offload(model, "cpu", group_size=2, prefetch_step=1)
    with caplog.at_level(logging.INFO, logger="prefetch_compile"), torch.no_grad():
        model(torch.randn(2, 16))
        runtime.start_recording()
        for _ in range(6):
            model(torch.randn(2, 16))
    assert _forwards_line(caplog) == []
    assert runtime.report().forwards == 6


def test_first_forwards_of_blocks_compiled_one_by_one_count_forwards_not_waits(caplog):
    """Each block waits twice per call (graph and hook), and the first forwards' window is counted in forwards.

    The blocks compile inside forward 1, after its first wait: the window starts two forwards after the count
    at the last compile, at forward 3."""
    model = llama_like.build(llama_like.tiny_shape(4), "cpu", torch.float32, seed=0)
    runtime = prefetch_compile.offload(model, "cpu", group_size=1, prefetch_step=2)
    for block in model.layers:
        block.compile(backend="prefetch_offload", options={"compiler": "aot_eager"}, dynamic=False)
    tokens = llama_like.sample_tokens(model.shape, 1, 4, seed=0)
    with caplog.at_level(logging.INFO, logger="prefetch_compile"), torch.no_grad():
        for _ in range(6):
            model(tokens)
    (line,) = _forwards_line(caplog)
    assert "forwards 3-5 of 'layers'" in line
    report = runtime.report()
    assert report.forwards == 3
    assert [(row.copies, row.waits) for row in report.layers] == [(3, 6)] * 4


def test_the_first_timed_forwards_of_generate_come_after_its_decode_compile(caplog):
    """generate compiles its prefill at forward 1 and its decode at forward 2: the forwards logged are 3-5, whose
    copies' windows hold no compile (forward 2's window of the first layer held the whole decode compile)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, eos_token_id=None,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.forward = torch.compile(model.forward, backend="prefetch_offload", options={"group_size": 2, "prefetch_step": 1})
    prompt = torch.randint(3, 128, (1, 7))
    with caplog.at_level(logging.INFO, logger="prefetch_compile"), torch.no_grad():
        model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, cache_implementation="static")
    (line,) = _forwards_line(caplog)
    assert "forwards 3-5 of 'model.layers': 3 forwards, 6 copies" in line
    report = prefetch_compile.runtime_of(model).report()
    assert all(row.window_s < 0.05 for row in report.layers), report.render()  # milliseconds, not a compile


def test_first_forwards_recording_gives_up_when_forwards_cannot_be_told_apart(caplog):
    """Waits that never return to the first offloaded layer count no forward: after a bounded number of them
    the automatic recording stops (it would otherwise grow with every call) and nothing is logged."""
    model = Stack(["linear"] * 4)
    runtime = prefetch_compile.offload(model, "cpu", group_size=1, prefetch_step=4)
    recorder = runtime.recorder
    with caplog.at_level(logging.INFO, logger="prefetch_compile"):
        for _ in range(recorder.max_waits + 10):
            runtime.wait(1)
    assert recorder.abandoned and len(recorder._waits) == recorder.max_waits
    with torch.no_grad():
        model(torch.randn(2, 16))  # an entry from outside: the abandoned recording is dropped
    assert runtime.recorder is None and _forwards_line(caplog) == []
    with pytest.raises(RuntimeError, match="nothing recorded"):
        runtime.report()


def test_stop_recording_ends_the_first_forwards_recording(caplog):
    model = Stack(["linear"] * 4)
    runtime = prefetch_compile.offload(model, "cpu", group_size=2, prefetch_step=1)
    runtime.stop_recording()
    with caplog.at_level(logging.INFO, logger="prefetch_compile"), torch.no_grad():
        for _ in range(6):
            model(torch.randn(2, 16))
    assert runtime.recorder is None and _forwards_line(caplog) == []


def test_report_after_stop_recording_covers_the_recorded_forwards():
    """start, forwards, stop, report: the report is the recording's, not the first forwards' logged earlier."""
    model = Stack(["linear"] * 4)
    runtime = prefetch_compile.offload(model, "cpu", group_size=2, prefetch_step=1)
    with torch.no_grad():
        for _ in range(6):
            model(torch.randn(2, 16))
        assert runtime.report().forwards == 3  # the first timed forwards
        runtime.start_recording()
        for _ in range(10):
            model(torch.randn(2, 16))
        runtime.stop_recording()
        model(torch.randn(2, 16))  # after the stop: not recorded
    report = runtime.report()
    assert report.forwards == 10
    assert [row.copies for row in report.layers] == [10, 10]


@pytest.mark.parametrize("seconds,shown", [(1.0, "0.07 GB/s"), (1.0e-3, "70 GB/s"), (1.27e-3, "55.1 GB/s")])
def test_the_totals_show_a_slow_bandwidth_as_it_is(seconds, shown):
    """One decimal showed a slow CPU's 0.07 GB/s as 0.0."""
    from prefetch_compile.report import CopyReport, LayerReport

    row = LayerReport(0, "layers.1", 70_000_000, 1, 70_000_000, seconds, None, 0.0, 1, 0)
    assert f"achieved bandwidth {shown}," in CopyReport((row,), forwards=1).totals()
