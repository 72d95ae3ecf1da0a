"""The budget on a CUDA device: peak memory stays under it; runtime.report() reads the copies from CUDA events."""

from __future__ import annotations

import statistics

import pytest
import torch

import prefetch_compile

llama_like = pytest.importorskip("llama_like")  # examples/, on the path through tests/gpu/conftest.py

SHAPE = llama_like.LlamaShape(vocab=1024, hidden=1024, intermediate=4096, heads=16, kv_heads=4, layers=8)


@pytest.fixture(autouse=True)
def _fresh_profile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFETCH_COMPILE_CACHE_DIR", str(tmp_path))  # measure the device afresh, away from ~/.cache


def model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("calibrate", [False, True])
def test_peak_device_memory_stays_under_the_budget(calibrate):
    model = llama_like.build(SHAPE, "cpu", torch.bfloat16)
    tokens = llama_like.sample_tokens(SHAPE, 1, 256, "cuda")
    budget = model_bytes(model) * 6 // 10
    baseline = torch.cuda.memory_allocated()
    runtime = prefetch_compile.offload(model, "cuda", budget=budget, example_inputs=(tokens,), calibrate=calibrate)
    assert runtime is not None and runtime.stats().offloaded_layers > 0
    compiled = torch.compile(model, backend="prefetch_offload")
    with torch.inference_mode():
        compiled(tokens)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            compiled(tokens)
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - baseline
    print(f"budget {budget / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB, plan {runtime.plan.options}")
    assert peak <= budget


def test_report_reads_every_copy_and_the_stall():
    model = llama_like.build(SHAPE, "cuda", torch.bfloat16)
    runtime = prefetch_compile.offload(model, "cuda", group_size=2, prefetch_step=1)
    compiled = torch.compile(model, backend="prefetch_offload")
    tokens = llama_like.sample_tokens(SHAPE, 1, 1, "cuda")
    with torch.inference_mode():
        for _ in range(2):
            compiled(tokens)
        runtime.start_recording()
        copies_before = runtime.counters.copies
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            compiled(tokens)
        end.record()
        torch.cuda.synchronize()
    report = runtime.report()
    print(report.render())
    forward_s = start.elapsed_time(end) / 1e3 / 5
    assert report.forwards == 5 and report.misses == 0
    # One slot, four offloaded layers: all four move every forward (in chunks: "auto" cuts these 30 MB blocks).
    assert report.copied_bytes == 5 * sum(layer.nbytes for layer in runtime.offloaded)
    assert report.copies == runtime.counters.copies - copies_before
    assert 1e9 < report.bandwidth < 1e12
    assert 0 <= report.stall_per_forward < forward_s
    assert statistics.fmean(row.copy_s for row in report.layers) > 0
