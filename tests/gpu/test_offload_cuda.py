"""The backend on a CUDA device: outputs, memory, overlap of copies with compute, CUDA graphs, weight updates."""

from __future__ import annotations

import copy
import gc
import json

import pytest
import torch

import prefetch_compile
from prefetch_compile.memory import HostArena
from prefetch_compile.runtime import PrefetchRuntime

llama_like = pytest.importorskip("llama_like")

DEVICE = "cuda"


def small_llama_shape(layers: int = 8):
    """Big enough that a layer copy takes measurable time (about 25 MB per layer in bf16)."""
    return llama_like.LlamaShape(vocab=1024, hidden=1024, intermediate=4096, heads=16, kv_heads=4, layers=layers)


@pytest.fixture(autouse=True)
def _clean_cuda():
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    yield
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def assert_bf16_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to bf16 rounding: the prefetch ops change which values Inductor keeps in
    registers and which it rounds to bf16 in memory, so bits may differ by a few ulps."""
    error = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    identical = (got == want).float().mean().item()
    print(f"max error {error:.3g} of scale {scale:.3g}; {identical:.1%} identical")
    assert error <= scale / 64, f"max error {error} exceeds 1/64 of the output scale {scale}"


def tokens(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 1024, (batch, seq), device=DEVICE)


@pytest.mark.parametrize("prefetch_step,chunked", [(1, False), (2, False), (1, True)])
def test_llama_like_bf16_matches_compiled_resident(prefetch_step, chunked):
    model = llama_like.build(small_llama_shape(), device=DEVICE, dtype=torch.bfloat16, seed=0)
    resident = torch.compile(copy.deepcopy(model))
    runtime = prefetch_compile.offload(
        model, DEVICE, group_size=2, num_in_group=1, prefetch_step=prefetch_step, chunked_copies=chunked
    )
    assert (len(runtime.plan.piece_starts) > 1) == chunked
    compiled = torch.compile(model, backend="prefetch_offload")
    with torch.inference_mode():
        for batch, seq in [(1, 16), (4, 16), (1, 64), (4, 16), (1, 512)]:
            x = tokens(batch, seq)
            assert_bf16_close(compiled(x), resident(x))
    assert runtime.counters.ensure_misses == 0


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_chunked_copies_are_exact_in_float32(cuda_graphs):
    """One slot, chunked copies on the device's streams: the same numbers as the resident compiled model, and every
    byte of every offloaded layer copied once per forward (a chunk copied too early shows as a large error)."""
    model = llama_like.build(small_llama_shape(), device=DEVICE, dtype=torch.float32, seed=0)
    resident = torch.compile(copy.deepcopy(model))
    runtime = prefetch_compile.offload(model, DEVICE, group_size=2, prefetch_step=1, chunked_copies=True)
    compiled = torch.compile(model, backend="prefetch_offload", options={"cuda_graphs": cuda_graphs})
    layer_bytes = sum(layer.nbytes for layer in runtime.offloaded)
    with torch.inference_mode():
        for step, (batch, seq) in enumerate([(1, 256), (1, 256), (2, 1), (2, 1), (1, 256), (2, 1), (1, 256)]):
            x = tokens(batch, seq)
            copied = runtime.counters.copied_bytes
            torch.testing.assert_close(compiled(x), resident(x), rtol=1e-4, atol=1e-4)
            if step >= 4:  # both shapes warmed up (and captured)
                assert runtime.counters.copied_bytes - copied == layer_bytes
    assert runtime.counters.ensure_misses == 0 and runtime.counters.restores == 0


def test_hf_tiny_llama_on_cuda():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(DEVICE, torch.bfloat16).eval()
    resident = torch.compile(copy.deepcopy(model))
    prefetch_compile.offload(model, DEVICE, group_size=2)
    compiled = torch.compile(model, backend="prefetch_offload")
    with torch.inference_mode():
        x = tokens(2, 12) % 256
        assert_bf16_close(compiled(input_ids=x, use_cache=False).logits, resident(input_ids=x, use_cache=False).logits)


def test_peak_memory_is_kept_plus_pool_plus_activations():
    shape = small_llama_shape()
    x = tokens(4, 128)
    model = llama_like.build(shape, device=DEVICE, dtype=torch.bfloat16, seed=0)
    resident = torch.compile(model)
    with torch.inference_mode():
        resident(x)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        resident(x)
        activations = torch.cuda.max_memory_allocated() - base
    del resident, model
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()

    # Build on the CPU, offload to the device: the whole model never sits on the device.
    cpu_model = llama_like.build(shape, device="cpu", dtype=torch.bfloat16, seed=0)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    runtime = prefetch_compile.offload(cpu_model, DEVICE, group_size=2)
    stats = runtime.stats()
    placed = torch.cuda.memory_allocated() - before
    assert torch.cuda.max_memory_allocated() - before <= (stats.kept_device_bytes + stats.slot_pool_bytes) * 1.02
    assert abs(placed - (stats.kept_device_bytes + stats.slot_pool_bytes)) <= 0.02 * placed

    compiled = torch.compile(cpu_model, backend="prefetch_offload")
    with torch.inference_mode():
        compiled(x)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        compiled(x)
        peak = torch.cuda.max_memory_allocated() - before
    expected = stats.kept_device_bytes + stats.slot_pool_bytes + activations
    print(f"peak {peak} expected {expected} (kept {stats.kept_device_bytes}, pool {stats.slot_pool_bytes}, "
          f"activations {activations})")
    assert abs(peak - expected) <= 0.02 * expected


def test_reported_savings_match_measurement():
    model = llama_like.build(small_llama_shape(), device=DEVICE, dtype=torch.bfloat16, seed=0)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    runtime = prefetch_compile.offload(model, DEVICE, group_size=4, num_in_group=2, prefetch_step=2)
    torch.cuda.synchronize()
    measured = before - torch.cuda.memory_allocated()
    reported = runtime.stats().device_bytes_saved
    assert abs(measured - reported) <= 0.01 * reported, (measured, reported)
    assert runtime.host.buffer.is_pinned()


@pytest.mark.alone
@pytest.mark.parametrize("chunked", [False, True])
def test_copies_overlap_compute_and_never_overwrite_a_slot_being_read(tmp_path, chunked):
    """From a profiler trace: memcpys run beside kernels, and each starts after every kernel launched before it.

    Chunked, each layer's copy is several memcpys, each started after the previous layer's last read of its bytes.
    """
    model = llama_like.build(small_llama_shape(layers=8), device=DEVICE, dtype=torch.bfloat16, seed=0)
    runtime = prefetch_compile.offload(model, DEVICE, group_size=2, num_in_group=1, prefetch_step=1, chunked_copies=chunked)
    compiled = torch.compile(model, backend="prefetch_offload")
    x = tokens(1, 2048)
    with torch.inference_mode():
        for _ in range(2):
            compiled(x)
        torch.cuda.synchronize()
        copies_before = runtime.counters.copies
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as profile:
            compiled(x)
            torch.cuda.synchronize()
    copies_made = runtime.counters.copies - copies_before
    events = _trace_events(profile, tmp_path)
    kernels = [e for e in events if e.get("cat") == "kernel"]
    copies = _host_to_device_copies(events)
    # Kernels are launched through the runtime API (cuBLAS) or the driver API (Triton).
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    assert copies_made == (4 if not chunked else 4 * 4)  # per offloaded layer: the whole block, or 4 chunks (in..post-norm, gate, up, down)
    assert len(copies) == copies_made, [c["name"] for c in copies]
    overlapping = 0
    for copy_event in copies:
        copy_start, copy_end = copy_event["ts"], copy_event["ts"] + copy_event["dur"]
        issued = launches[copy_event["args"]["correlation"]]["ts"]
        earlier = [k for k in kernels if launches[k["args"]["correlation"]]["ts"] < issued]
        assert all(k["ts"] + k["dur"] <= copy_start + 1 for k in earlier), "a copy started before a kernel queued ahead of it finished"
        overlapping += any(k["ts"] < copy_end and copy_start < k["ts"] + k["dur"] for k in kernels)
    assert overlapping >= (3 if not chunked else len(copies) // 2), f"only {overlapping} of {len(copies)} copies overlapped a kernel"


def _trace_events(profile: torch.profiler.profile, tmp_path) -> list[dict]:
    profile.export_chrome_trace(str(tmp_path / "trace.json"))
    return json.loads((tmp_path / "trace.json").read_text())["traceEvents"]


def _host_to_device_copies(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")]


@pytest.mark.parametrize("chunked", [False, True])
def test_copies_after_a_replay_queue_behind_the_replays_copies(tmp_path, chunked):
    """With CUDA graphs, no two weight copies share the link at once, as on the one copy stream without graphs.

    The wrap-around prefetches are issued after each replay, outside the graph; each
    waits for the point of the graph where it would have started and for the copies the
    graph made before that point. Waiting for the first alone let it run beside the
    graph's last copies, which then arrived later and held up the replay's end.
    """
    model = llama_like.build(small_llama_shape(layers=8), device=DEVICE, dtype=torch.bfloat16, seed=0)
    runtime = prefetch_compile.offload(model, DEVICE, group_size=2, prefetch_step=1, chunked_copies=chunked)
    graphed = torch.compile(model, backend="prefetch_offload", options={"cuda_graphs": True})
    x = tokens(1, 1)  # decode: copy-bound, so copies queue up
    with torch.inference_mode():
        for _ in range(3):  # warm up, capture, replay
            graphed(x)
        torch.cuda.synchronize()
        copies_before = runtime.counters.copies
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            for _ in range(2):
                graphed(x)
            torch.cuda.synchronize()
    copies_made = runtime.counters.copies - copies_before
    copies = sorted(_host_to_device_copies(_trace_events(profile, tmp_path)), key=lambda e: e["ts"])
    assert copies_made == 2 * (4 if not chunked else 4 * 4)
    assert len(copies) == copies_made, "the profiler missed copies made inside the graph or after it"
    concurrent = [
        (earlier["ts"], later["ts"]) for earlier, later in zip(copies, copies[1:]) if later["ts"] < earlier["ts"] + earlier["dur"] - 1
    ]
    assert not concurrent, f"{len(concurrent)} of {len(copies)} copies began before the one ahead of them ended"


@pytest.mark.parametrize("prefetch_step,chunked", [(1, False), (2, False), (1, True)])
def test_cuda_graph_replays_stay_correct(prefetch_step, chunked):
    model = llama_like.build(small_llama_shape(), device=DEVICE, dtype=torch.bfloat16, seed=0)
    resident = torch.compile(copy.deepcopy(model))
    prefetch_compile.offload(model, DEVICE, group_size=2, prefetch_step=prefetch_step, chunked_copies=chunked)
    compiled = torch.compile(model, backend="prefetch_offload", options={"cuda_graphs": True})
    with torch.inference_mode():
        for step in range(12):
            batch = (1, 8, 1, 8)[step % 4]  # two captured batch sizes, replayed in turn
            x = tokens(batch, 1)
            assert_bf16_close(compiled(x), resident(x))


def test_a_forward_on_a_side_stream_orders_its_copies_on_it_and_leaves_it_current():
    """The runtime orders each copy after the stream the forward runs on, and leaves that stream current.

    Forwards alternate between the default stream and a side stream, so that the
    stream the runtime remembers from its last entry is never the current one.
    """
    model = llama_like.build(small_llama_shape(), device=DEVICE, dtype=torch.float32, seed=0)
    resident = torch.compile(copy.deepcopy(model))
    compiled = torch.compile(model, backend="prefetch_offload", options={"group_size": 2, "prefetch_step": 1})
    side = torch.cuda.Stream()
    default = torch.cuda.current_stream()
    with torch.inference_mode():
        for step, (batch, seq) in enumerate([(1, 64), (2, 16), (1, 64), (2, 16), (1, 64)]):
            x = tokens(batch, seq)
            want = resident(x)
            stream = side if step % 2 == 0 else default
            stream.wait_stream(default)
            with torch.cuda.stream(stream):
                got = compiled(x)
                assert torch.cuda.current_stream() == stream
            default.wait_stream(stream)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    runtime = prefetch_compile.runtime_of(model)
    assert runtime.counters.copies > 0 and runtime.counters.ensure_misses == 0


def test_weight_updates_reach_eager_and_graph_replays():
    model = llama_like.build(small_llama_shape(layers=4), device=DEVICE, dtype=torch.bfloat16, seed=0)
    reference = copy.deepcopy(model)
    runtime = prefetch_compile.offload(model, DEVICE, group_size=2)
    graphed = torch.compile(model, backend="prefetch_offload", options={"cuda_graphs": True})
    x = tokens(2, 1)
    with torch.inference_mode():
        graphed(x), graphed(x)  # warm up and capture
        for param in reference.parameters():
            param.mul_(-0.5)
        runtime.load_weights({name: p.detach() for name, p in reference.named_parameters()})
        want = reference(x)
        assert_bf16_close(graphed(x), want)
        assert_bf16_close(model(x), want)
        offloaded_name = next(iter(runtime.offloaded_params))
        with pytest.raises(ValueError, match="expects shape"):
            runtime.load_weights({offloaded_name: torch.zeros(3, device=DEVICE, dtype=torch.bfloat16)})
        assert_bf16_close(graphed(x), want)


def test_unpinned_host_storage_is_refused():
    model = llama_like.build(small_llama_shape(layers=2), device=DEVICE, dtype=torch.bfloat16, seed=0)
    runtime = prefetch_compile.offload(model, DEVICE, group_size=2)
    pageable = HostArena(runtime.plan)  # never pinned
    with pytest.raises(ValueError, match="page-locked"):
        PrefetchRuntime(runtime.plan, runtime.device, pageable, runtime.slots, runtime.offloaded_params, runtime.kept_tensors)
    compiled = torch.compile(model, backend="prefetch_offload")
    with torch.inference_mode():
        compiled(tokens(1, 4))  # the model is still usable
