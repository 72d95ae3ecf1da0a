"""Offloaded and compiled models compute exactly what an untouched copy computes.

On CPU the copies are synchronous, so a reader scheduled after the copy that
overwrites its slot reads another layer's weights and the numbers differ.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

import prefetch_compile
from toy_models import HeterogeneousStack, SplitStack, Stack

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import llama_like  # noqa: E402  (examples/llama_like.py)

MIXED = ["linear", "int8", "cast", "transposed", "packed", "linear", "int8", "cast"]


def run_both(model, options, batches, *, offload_first=None, compiler="inductor"):
    """Compile ``model`` with the backend, run it and a pristine copy on every batch, return output pairs."""
    reference = copy.deepcopy(model)
    if offload_first is not None:
        prefetch_compile.offload(model, "cpu", **offload_first)
    compiled = torch.compile(model, backend="prefetch_offload", options={**options, "compiler": compiler})
    pairs = []
    with torch.no_grad():
        for batch in batches:
            pairs.append((compiled(batch), reference(batch)))
    return pairs


def assert_all_equal(pairs):
    for index, (got, want) in enumerate(pairs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"call {index}: {m}")


def batches(count=3, rows=3, width=16):
    return [torch.randn(rows, width) for _ in range(count)]


@pytest.mark.parametrize("compiler", ["inductor", "aot_eager", "eager"])
def test_every_layer_through_one_slot(compiler):
    """The harshest schedule: all layers offloaded, one slot, weight-only work in every block."""
    options = {"group_size": 1, "num_in_group": 1, "prefetch_step": 1}
    assert_all_equal(run_both(Stack(MIXED), options, batches(), compiler=compiler))


@pytest.mark.parametrize(
    "group_size,num_in_group,prefetch_step",
    [(2, 1, 1), (4, 1, 2), (4, 2, 2), (3, 2, 3), (2, 2, 4)],
)
def test_group_patterns_and_deeper_prefetch(group_size, num_in_group, prefetch_step):
    options = {"group_size": group_size, "num_in_group": num_in_group, "prefetch_step": prefetch_step}
    assert_all_equal(run_both(Stack(MIXED), options, batches()))


def test_weight_only_work_under_inductor():
    """int8 dequantisation, a dtype cast and a transposed copy, alternating through one slot."""
    kinds = ["int8", "cast", "transposed"] * 2
    assert_all_equal(run_both(Stack(kinds), {"group_size": 1, "prefetch_step": 1}, batches()))


def test_every_parameter_dtype():
    """int8, uint8-packed, fp8, bf16 and float64 parameters share slots with float32 ones."""
    kinds = ["packed", "int8", "cast", "linear"] * 2
    assert_all_equal(run_both(Stack(kinds), {"group_size": 1}, batches()))


# A graph break in the layer loop makes Dynamo run the model's forward eagerly and compile each block on
# its own, so the one-line path offloads nothing there (tests/test_moe.py); these models are offloaded first.
def test_graph_breaks_between_layers():
    model = Stack(MIXED, break_after=(1, 4))
    assert_all_equal(run_both(model, {}, batches(), offload_first={"group_size": 2, "prefetch_step": 2}))
    assert len(prefetch_compile.runtime_of(model).offloaded) == 4


def test_graph_break_inside_a_layer():
    """A layer read on both sides of a graph break is reloaded where needed, never read stale."""
    model = SplitStack(4)
    assert_all_equal(run_both(model, {}, batches(), offload_first={"group_size": 1}))
    assert len(prefetch_compile.runtime_of(model).offloaded) == 4


def test_heterogeneous_layer_sizes():
    model = HeterogeneousStack([16, 64, 8, 48, 16, 32, 16])
    assert_all_equal(run_both(model, {"group_size": 2, "num_in_group": 1}, batches(width=16)))
    assert_all_equal(run_both(HeterogeneousStack([16, 64, 8, 48, 16]), {"group_size": 1}, batches(width=16)))


def test_offload_params_whitelist():
    model = Stack(["linear"] * 4)
    reference = copy.deepcopy(model)
    runtime = prefetch_compile.offload(model, "cpu", group_size=1, offload_params=["fc.weight"])
    offloaded = sorted(runtime.offloaded_params)
    assert offloaded == [f"layers.{i}.fc.weight" for i in range(4)]
    compiled = torch.compile(model, backend="prefetch_offload")
    with torch.no_grad():
        for batch in batches():
            torch.testing.assert_close(compiled(batch), reference(batch))


def test_changing_batch_sizes_recompile_correctly():
    pairs = run_both(
        Stack(MIXED),
        {"group_size": 2},
        [torch.randn(rows, 16) for rows in (1, 5, 2, 7, 3)],
    )
    assert_all_equal(pairs)


def test_two_models_in_one_process_have_their_own_runtimes():
    first, second = Stack(MIXED), Stack(["linear"] * 6, width=16)
    first_ref, second_ref = copy.deepcopy(first), copy.deepcopy(second)
    first_rt = prefetch_compile.offload(first, "cpu", group_size=1)
    second_rt = prefetch_compile.offload(second, "cpu", group_size=2, prefetch_step=2)
    assert first_rt is not second_rt
    compiled_first = torch.compile(first, backend="prefetch_offload")
    compiled_second = torch.compile(second, backend="prefetch_offload")
    with torch.no_grad():
        for batch in batches():
            torch.testing.assert_close(compiled_first(batch), first_ref(batch))
            torch.testing.assert_close(compiled_second(batch), second_ref(batch))
            torch.testing.assert_close(compiled_first(batch), first_ref(batch))


def test_offload_first_then_compile_and_eager_calls_interleave():
    """offload() then compile; uncompiled calls in between keep the slot invariant."""
    model = Stack(MIXED)
    reference = copy.deepcopy(model)
    prefetch_compile.offload(model, "cpu", group_size=2, prefetch_step=2)
    compiled = torch.compile(model, backend="prefetch_offload")
    with torch.inference_mode():
        for batch in batches(4):
            torch.testing.assert_close(compiled(batch), reference(batch))
            torch.testing.assert_close(model(batch), reference(batch))


def test_one_compiled_function_serves_kept_and_offloaded_blocks():
    """Dynamo compiles a block-calling function once per kind of block, never one graph for both."""
    model = Stack(["linear"] * 6)
    reference = copy.deepcopy(model)
    prefetch_compile.offload(model, "cpu", group_size=2)

    @torch.compile(backend="prefetch_offload")
    def run_block(block, x):
        return block(x)

    with torch.no_grad():
        for _ in range(2):
            x = want = torch.randn(3, 16)
            for block, reference_block in zip(model.layers, reference.layers):
                x, want = run_block(block, x), reference_block(want)
            torch.testing.assert_close(x, want)


# ------------------------------------------------------------------ chunked copies
def _chunked_forwards(model, runtime, compiled, inputs):
    """Run ``compiled`` on each input; per forward after the first, check the copies moved every byte of every
    offloaded layer once, in more copies than layers (so the schedule really was chunked), with no ensure miss."""
    layer_bytes = sum(layer.nbytes for layer in runtime.offloaded)
    outputs = []
    with torch.no_grad():
        for number, x in enumerate(inputs):
            copies, copied = runtime.counters.copies, runtime.counters.copied_bytes
            outputs.append(compiled(x))
            if number:
                assert runtime.counters.copied_bytes - copied == layer_bytes
                assert runtime.counters.copies - copies > len(runtime.offloaded)
    assert runtime.counters.ensure_misses == 0
    return outputs


@pytest.mark.parametrize(
    "kinds,compiler",
    [
        (["linear"] * 6, "inductor"),
        (["linear"] * 6, "aot_eager"),
        (["linear"] * 6, "eager"),
        (["int8"] * 4, "inductor"),
        (["packed"] * 4, "inductor"),
    ],
)
def test_chunked_copies_through_one_slot(kinds, compiler):
    """Every layer through one slot, each copy cut at the parameters: a start above a reader of the bytes it
    overwrites, or a reader above its chunk's wait, reads another layer's bytes (CPU copies are synchronous)."""
    model = Stack(kinds)
    reference = copy.deepcopy(model)
    options = {"group_size": 1, "prefetch_step": 1, "chunked_copies": True, "compiler": compiler}
    compiled = torch.compile(model, backend="prefetch_offload", options=options)
    inputs = batches(4)
    with torch.no_grad():
        compiled(inputs[0])  # offloads at the first call
    runtime = prefetch_compile.runtime_of(model)
    assert len(runtime.plan.piece_starts) > 1
    assert_all_equal(zip(_chunked_forwards(model, runtime, compiled, inputs), [reference(x) for x in inputs]))


def test_chunked_copies_in_two_slots_with_graph_breaks():
    """Chunks wrap around the forward in each slot, and graphs that end inside the stack hand chunks to the next."""
    model = Stack(["linear"] * 8, break_after=(2, 5))
    reference = copy.deepcopy(model)
    runtime = prefetch_compile.offload(model, "cpu", group_size=2, num_in_group=2, prefetch_step=2, chunked_copies=True)
    compiled = torch.compile(model, backend="prefetch_offload")
    inputs = batches(3)
    assert_all_equal(zip(_chunked_forwards(model, runtime, compiled, inputs), [reference(x) for x in inputs]))


def test_chunked_copies_of_heterogeneous_layers_fall_back_to_whole_blocks():
    """Blocks of different shapes share no parameter boundary: one piece each, copied whole, still exact."""
    model = HeterogeneousStack([16, 64, 8, 48, 16])
    runtime = prefetch_compile.offload(copy.deepcopy(model), "cpu", group_size=1, chunked_copies=True)
    assert runtime.plan.piece_starts == (0,)
    assert_all_equal(run_both(model, {"group_size": 1, "chunked_copies": True}, batches(width=16)))


@pytest.mark.parametrize("compiler", ["inductor", "aot_eager"])
def test_chunked_copies_of_llama_like(compiler):
    """examples/llama_like.py (tiny): three offloaded layers take turns in one slot, nine pieces each."""
    model = llama_like.build(llama_like.tiny_shape(6), "cpu", torch.float32, seed=0)
    reference = copy.deepcopy(model)
    runtime = prefetch_compile.offload(model, "cpu", group_size=2, prefetch_step=1, chunked_copies=True)
    assert len(runtime.offloaded) == 3 and len(runtime.plan.piece_starts) == 9
    compiled = torch.compile(model, backend="prefetch_offload", options={"compiler": compiler})
    inputs = [llama_like.sample_tokens(model.shape, batch, seq, seed=batch) for batch, seq in [(2, 8), (2, 8), (1, 5)]]
    outputs = _chunked_forwards(model, runtime, compiled, inputs)
    with torch.no_grad():
        assert_all_equal(zip(outputs, [reference(x) for x in inputs]))
