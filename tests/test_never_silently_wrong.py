"""Every path a user takes on an offloaded model is right or refused with a clear error (issue 8).

Each test here failed (wrong numbers, wasted copies, or a misleading error) before
the fix it covers: copies per forward when the offloaded layers are not a multiple
of prefetch_step, state_dict/load_state_dict, deepcopy/pickle, .to(dtype), eager
backward, requires_grad inputs, two threads, and the op declarations.
"""

from __future__ import annotations

import copy
import logging
import pickle
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import pytest
import torch

import prefetch_compile
from prefetch_compile.ops import START, WAIT
from toy_models import SplitStack, Stack


def _offloaded(kinds, **knobs):
    model = Stack(kinds)
    reference = copy.deepcopy(model)
    runtime = prefetch_compile.offload(model, "cpu", **knobs)
    return model, reference, runtime


@pytest.mark.parametrize("layers,step", [(5, 2), (7, 3), (6, 4), (4, 2), (3, 1)])
@pytest.mark.parametrize("compiler", ["inductor", "eager"])
def test_each_offloaded_layer_is_copied_exactly_once_per_forward(layers, step, compiler):
    """5 layers at step 2 used to make 7 copies per forward (the wrap-around landed in the wrong slot).

    A layer alone in its slot (6 layers, 4 slots: layers 2 and 3) stays resident and is never copied again.
    """
    model, reference, runtime = _offloaded(["linear"] * layers, group_size=1, prefetch_step=step)
    per_slot = [sum(1 for index in range(layers) if index % step == slot) for slot in range(min(step, layers))]
    copies_per_forward = sum(count for count in per_slot if count > 1)
    compiled = torch.compile(model, backend="prefetch_offload", options={"compiler": compiler})
    x = torch.randn(3, 16)
    with torch.no_grad():
        compiled(x)  # compiles; the first forward runs from the state offload() left
        for _ in range(3):
            before = runtime.counters.copies
            out = compiled(x)
            assert runtime.counters.copies - before == copies_per_forward
            torch.testing.assert_close(out, reference(x), rtol=1e-6, atol=1e-6)
    assert runtime.counters.ensure_misses == 0


@pytest.mark.parametrize("layers,step", [(5, 2), (4, 1), (6, 4)])
@pytest.mark.parametrize("compiler", ["inductor", "eager"])
def test_chunked_copies_move_every_byte_once_per_forward(layers, step, compiler):
    """The invariant above, chunk by chunk: each layer of a shared slot moves as three chunks (fc.weight, fc.bias,
    gain, read in that order), and together they copy each of its bytes exactly once per forward."""
    model, reference, runtime = _offloaded(["linear"] * layers, group_size=1, prefetch_step=step, chunked_copies=True)
    shared = [layer for layer in runtime.offloaded if runtime.plan.next_in_slot(layer.offload_index) != layer.offload_index]
    compiled = torch.compile(model, backend="prefetch_offload", options={"compiler": compiler})
    x = torch.randn(3, 16)
    with torch.no_grad():
        compiled(x)
        for _ in range(3):
            copies, copied = runtime.counters.copies, runtime.counters.copied_bytes
            torch.testing.assert_close(compiled(x), reference(x), rtol=1e-6, atol=1e-6)
            assert runtime.counters.copies - copies == 3 * len(shared)
            assert runtime.counters.copied_bytes - copied == sum(layer.nbytes for layer in shared)
    assert runtime.counters.ensure_misses == 0


def test_a_block_split_by_a_graph_break_loads_once_with_chunked_copies():
    """Without chunks, the graph after the break finds its layer overwritten and reloads it (counted); with them, the
    first graph releases only the pieces it read, and the second finds its own still in the slot."""
    model = SplitStack(4)
    reference = copy.deepcopy(model)
    runtime = prefetch_compile.offload(model, "cpu", group_size=1, chunked_copies=True)
    compiled = torch.compile(model, backend="prefetch_offload")
    x = torch.randn(3, 16)
    with torch.no_grad():
        compiled(x)
        for _ in range(2):
            copied = runtime.counters.copied_bytes
            torch.testing.assert_close(compiled(x), reference(x), rtol=1e-6, atol=1e-6)
            assert runtime.counters.copied_bytes - copied == sum(layer.nbytes for layer in runtime.offloaded)
    assert runtime.counters.ensure_misses == 0


@pytest.mark.parametrize("chunked", [False, True])
def test_uncompiled_model_copies_each_layer_once_too(chunked):
    """An eager block call waits for and prefetches whole layers: one copy each, chunked plan or not."""
    model, reference, runtime = _offloaded(["linear"] * 5, group_size=1, prefetch_step=2, chunked_copies=chunked)
    x = torch.randn(3, 16)
    with torch.no_grad():
        for _ in range(2):
            before, copied = runtime.counters.copies, runtime.counters.copied_bytes
            torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
            assert runtime.counters.copies - before == 5
            assert runtime.counters.copied_bytes - copied == sum(layer.nbytes for layer in runtime.offloaded)
    assert runtime.counters.ensure_misses == 0


def test_ensure_misses_are_counted_and_warned_once_per_graph(caplog):
    """A layer nobody prefetched (an eager call of one block between forwards) is copied on the spot: counted and said."""
    model, reference, runtime = _offloaded(["linear"] * 4, group_size=1)
    compiled = torch.compile(model, backend="prefetch_offload")
    x = torch.randn(3, 16)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="prefetch_compile"):
        for _ in range(3):
            torch.testing.assert_close(compiled(x), reference(x), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(model.layers[2](x), reference.layers[2](x), rtol=1e-6, atol=1e-6)
    warnings = [r.getMessage() for r in caplog.records if "was not resident" in r.getMessage()]
    assert warnings, "an ensure miss must be logged"
    assert runtime.counters.ensure_misses > 0
    graphs = set(runtime.counters.misses_by_graph)
    assert len(warnings) == len(graphs)  # once per graph, not once per miss
    assert sum(runtime.counters.misses_by_graph.values()) == runtime.counters.ensure_misses


def test_a_graph_break_inside_a_block_loads_it_once():
    """Dynamo runs a block with a graph break eagerly and compiles its halves: its hooks own its loading.

    The first half's start_prefetch used to evict the block before the second half ran,
    which then copied it again (an ensure miss per block and forward).
    """
    model = SplitStack(4)
    reference = copy.deepcopy(model)
    runtime = prefetch_compile.offload(model, "cpu", group_size=1)
    compiled = torch.compile(model, backend="prefetch_offload")
    x = torch.randn(3, 16)
    with torch.no_grad():
        compiled(x)
        before = runtime.counters.copies
        for _ in range(2):
            torch.testing.assert_close(compiled(x), reference(x), rtol=1e-6, atol=1e-6)
    assert runtime.counters.ensure_misses == 0
    assert runtime.counters.copies - before == 2 * len(runtime.offloaded)  # each layer once per forward


# ---------------------------------------------------------------- state_dict
def test_state_dict_returns_every_layers_true_weights():
    model, reference, _ = _offloaded(["linear", "int8", "cast", "packed"] * 2, group_size=2, prefetch_step=1)
    with torch.no_grad():
        model(torch.randn(3, 16))  # leaves some later layer in the shared slot
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name].cpu(), want[name]), name
    # A submodule's own state_dict goes through the same hook.
    assert torch.equal(model.layers[5].state_dict()["qweight"], reference.layers[5].qweight)


@pytest.mark.parametrize("compiled_first", [False, True])
def test_load_state_dict_updates_the_host_copies(compiled_first):
    model, _, runtime = _offloaded(["linear"] * 4, group_size=2, prefetch_step=1)
    other = Stack(["linear"] * 4)  # fresh random weights
    compiled = torch.compile(model, backend="prefetch_offload")
    x = torch.randn(3, 16)
    with torch.no_grad():
        if compiled_first:
            compiled(x)
        result = model.load_state_dict(other.state_dict())
        assert result.missing_keys == [] and result.unexpected_keys == []
        torch.testing.assert_close(compiled(x), other(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(x), other(x), rtol=0, atol=0)
    for name, value in other.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_load_state_dict_casts_like_pytorch_and_refuses_assign():
    model, _, _ = _offloaded(["linear"] * 4, group_size=2)  # layers 1 and 3 share the one slot
    other = Stack(["linear"] * 4)
    halved = {name: value.double() for name, value in other.state_dict().items()}
    model.load_state_dict(halved)  # PyTorch casts to the parameter's dtype; so does the host copy
    with torch.no_grad():
        torch.testing.assert_close(model(torch.ones(1, 16)), other(torch.ones(1, 16)), rtol=1e-6, atol=1e-6)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    fresh = Stack(["linear"] * 4)
    refusal = r"assign=True\) would replace offloaded parameter layers\.1\.\S+ with a tensor outside its slot; nothing was"
    with pytest.raises(RuntimeError, match=refusal):
        model.load_state_dict(fresh.state_dict(), assign=True)
    # proj and layers.0 come before layers.1 in load order: they must not have taken fresh's values either.
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    with torch.no_grad():
        torch.testing.assert_close(model(torch.ones(1, 16)), other(torch.ones(1, 16)), rtol=1e-6, atol=1e-6)


def test_load_state_dict_size_mismatch_is_reported_and_changes_nothing_offloaded():
    model, reference, runtime = _offloaded(["linear"] * 2, group_size=2)
    state = reference.state_dict()
    state["layers.1.fc.weight"] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match=r"size mismatch for layers\.1\.fc\.weight"):
        model.load_state_dict(state)
    assert torch.equal(runtime.host_value("layers.1.fc.weight"), reference.layers[1].fc.weight)


def test_host_value_of_a_kept_parameter_says_it_stays_on_the_device():
    model, reference, runtime = _offloaded(["linear"] * 2, group_size=2)
    with pytest.raises(KeyError, match=r"'layers\.0\.fc\.weight' is not an offloaded parameter of this runtime"):
        runtime.host_value("layers.0.fc.weight")


# ------------------------------------------------------- model-level calls
@pytest.mark.parametrize("target", ["model", "block", "owner"])
def test_deepcopy_and_pickle_are_refused(target):
    model, _, _ = _offloaded(["linear"] * 2, group_size=2)
    obj = {"model": model, "block": model.layers[1], "owner": model.layers[1].fc}[target]
    with pytest.raises(RuntimeError, match="is offloaded by prefetch_compile"):
        copy.deepcopy(obj)
    with pytest.raises(RuntimeError, match="is offloaded by prefetch_compile"):
        pickle.dumps(obj)


@pytest.mark.parametrize("compiled", [False, True])
def test_changing_dtype_after_offload_is_refused_at_the_next_call(compiled):
    model, _, _ = _offloaded(["linear"] * 2, group_size=2)
    run = torch.compile(model, backend="prefetch_offload") if compiled else model
    with torch.no_grad():
        run(torch.randn(2, 16))
        model.to(torch.float64)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(Exception, match=r"offloaded parameter layers\.1\.\w+\.?\w* no longer lives in its device slot"):
                run(torch.randn(2, 16, dtype=torch.float64))
    # The refusal comes alone: the block's always-called hook used to release a lock never taken, and say so.
    assert not [w for w in caught if "always_call" in str(w.message)]



@pytest.mark.parametrize("convert", ["half", "to_bfloat16"])
def test_state_dict_after_a_dtype_change_is_refused_as_the_next_call_is(convert):
    """After ``model.half()`` the kept parameters are float16 while the host copies stay float32.

    ``state_dict()`` used to return that mix without a word (a new-user trial), so
    ``torch.save(model.state_dict())`` saved a model half converted. It is refused
    with the forward's own message.
    """
    model, _, _ = _offloaded(["linear"] * 2, group_size=2)
    model.half() if convert == "half" else model.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"offloaded parameter layers\.1\.\w+\.?\w* no longer lives in its device slot"):
        model.state_dict()

@pytest.mark.parametrize("compiler", ["inductor", "aot_eager"])
def test_a_dtype_round_trip_after_offload_is_refused_at_the_next_call(compiler):
    """``model.to(bfloat16).to(float32)`` leaves every guard as it was, so Dynamo reuses the graph.

    It used to run, silently wrong: each offloaded parameter had been given new storage
    holding whatever layer sat in its slot at the conversion (layer 1's values for layer 3),
    while the ops kept copying the right layer into the slot nobody read any more.
    """
    model, _, _ = _offloaded(["linear"] * 4, group_size=2)
    compiled = torch.compile(model, backend="prefetch_offload", options={"compiler": compiler})
    x = torch.randn(2, 16)
    with torch.no_grad():
        compiled(x)
        model.to(torch.bfloat16).to(torch.float32)
        with pytest.raises(RuntimeError, match=r"offloaded parameter layers\.1\.\w+\.?\w* no longer lives in its device slot"):
            compiled(x)
        with pytest.raises(RuntimeError, match="no longer lives in its device slot"):
            compiled(x)  # the refusal released the runtime's lock and is raised again, not deadlocked or skipped

def test_eager_backward_is_refused():
    model, _, _ = _offloaded(["linear"] * 2, group_size=2)
    with pytest.raises(RuntimeError, match=r"layers\.1 is offloaded and grad mode is on"):
        model(torch.randn(2, 16)).sum().backward()
    with torch.no_grad():
        model(torch.randn(2, 16))  # the refusal released the runtime: the model still works


def test_requires_grad_input_is_refused_as_inference_only():
    """It used to surface as a misleading SlotConflictError from the joint forward/backward graph."""
    model, _, _ = _offloaded(["linear"] * 4, group_size=1)
    model.requires_grad_(False)
    compiled = torch.compile(model, backend="prefetch_offload")
    with pytest.raises(Exception, match="prefetch_offload is for inference") as caught:
        compiled(torch.randn(2, 16, requires_grad=True))
    assert "SlotConflictError" not in repr(caught.value)


def test_two_threads_get_right_answers():
    model, reference, runtime = _offloaded(["linear", "int8"] * 3, group_size=1, prefetch_step=1)
    compiled = torch.compile(model, backend="prefetch_offload")
    inputs = [torch.randn(3, 16) for _ in range(8)]
    with torch.no_grad():
        expected = [reference(x) for x in inputs]
        compiled(inputs[0])  # compile once, on this thread
    errors: list[str] = []

    def serve(offset: int) -> None:
        with torch.no_grad():
            for step in range(40):
                index = (step + offset) % len(inputs)
                got = compiled(inputs[index])
                if not torch.allclose(got, expected[index], rtol=1e-6, atol=1e-6):
                    errors.append(f"thread {offset} step {step}: max error {(got - expected[index]).abs().max():.3g}")

    threads = [threading.Thread(target=serve, args=(offset,)) for offset in (0, 3, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


# ---------------------------------------------------------------- the ops
@pytest.mark.parametrize("chunked", [False, True])
def test_ops_pass_opcheck(chunked):
    """The schemas say what the ops do: torch.library.opcheck runs them in every mode it knows.

    Chunked, each op takes one piece of a layer (its fc.weight, fc.bias or gain) and writes just that.
    """
    model, _, runtime = _offloaded(["linear"] * 4, group_size=2, prefetch_step=1, chunked_copies=chunked)
    first = [runtime.offloaded_params[p.name] for p in runtime.offloaded[0].params]
    second = [runtime.offloaded_params[p.name] for p in runtime.offloaded[1].params]
    live = [torch.randn(3, 16)]
    assert len(runtime.plan.piece_starts) == (3 if chunked else 1)
    chunks = [(first[piece : piece + 1], second[piece : piece + 1]) for piece in range(3)] if chunked else [(first, second)]
    with torch.no_grad():
        for outgoing, incoming in chunks:
            torch.library.opcheck(WAIT, (incoming,))  # not resident: the wait copies it in (a real write)
            torch.library.opcheck(WAIT, (outgoing,))
            torch.library.opcheck(START, (outgoing, [], live))
            torch.library.opcheck(START, (incoming, outgoing, live))


def test_fx_graph_cache_serves_a_second_process(tmp_path: Path):
    """The compiled code holds no process-specific value, so a second process hits Inductor's cache."""
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from torch._dynamo.utils import counters
        from toy_models import Stack
        torch.manual_seed(0)
        model = Stack(["linear"] * 4)
        reference = Stack(["linear"] * 4); reference.load_state_dict(model.state_dict())
        compiled = torch.compile(model, backend="prefetch_offload", options={{"group_size": 2}})
        x = torch.randn(3, 16)
        with torch.no_grad():
            assert torch.allclose(compiled(x), reference(x), rtol=1e-6, atol=1e-6)
            assert torch.allclose(compiled(x), reference(x), rtol=1e-6, atol=1e-6)
        print("hits", counters["inductor"]["fxgraph_cache_hit"], "misses", counters["inductor"]["fxgraph_cache_miss"])
        """
    )
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    runs = [
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    first, second = (run.stdout.strip().splitlines()[-1] for run in runs)
    assert first.startswith("hits 0 misses ") and not first.endswith("misses 0"), first
    assert second.startswith("hits ") and not second.startswith("hits 0"), second


def test_the_fx_graph_cache_key_covers_the_pass_code():
    """Editing the pass must change the cache key, or a warm cache serves code the old pass wrote.

    In a source checkout passes/ is not below prefetch_compile/: the key once hashed no pass file.
    """
    from prefetch_compile import _torch_internals, passes

    files = {Path(name) for name in _torch_internals.pass_source_files()}
    package = Path(passes.__file__).resolve().parent
    assert {package / "prefetch.py", package / "param_readers.py", package / "sink_weight_only.py"} <= files
    assert all(path.is_file() for path in files)


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_an_offloaded_model_compiled_by_another_backend_refuses_to_run(backend):
    """Stock torch.compile on an offloaded model read slots holding other layers (max error ~2.5, silently)."""
    model, _, _ = _offloaded(["linear"] * 4, group_size=1)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad(), pytest.raises(RuntimeError, match='compiled by another torch.compile backend'):
        compiled(torch.randn(3, 16))


def test_a_model_without_a_block_list_says_nothing_was_offloaded(caplog):
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    compiled = torch.compile(model, backend="prefetch_offload", options={"compiler": "aot_eager"})
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="prefetch_compile"):
        compiled(torch.randn(2, 16))
    assert any("nothing offloaded" in record.getMessage() and "Sequential" in record.getMessage() for record in caplog.records)
    assert prefetch_compile.runtime_of(model) is None


def test_a_twin_served_a_graph_compiled_for_an_offloaded_model_says_so(caplog):
    """A second instance of one class, compiled the same way: Dynamo serves it the first model's graph.

    That graph's guards were built before the first model was offloaded, so the backend (which offloads)
    never runs for the twin. Its answers stay right, but it is not offloaded: that must not pass in silence.
    """
    transformers = pytest.importorskip("transformers")
    from model_zoo import tiny_decoder_config

    def tiny(seed: int):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**tiny_decoder_config())).eval()

    first, twin = tiny(0), tiny(1)
    reference = copy.deepcopy(twin)
    options = {"group_size": 2, "compiler": "aot_eager"}
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="prefetch_compile"):
        torch.compile(first, backend="prefetch_offload", options=options)(ids)
        got = torch.compile(twin, backend="prefetch_offload", options=options)(ids).logits
    assert prefetch_compile.runtime_of(first) is not None
    torch.testing.assert_close(got, reference(ids).logits, rtol=0, atol=0)
    if prefetch_compile.runtime_of(twin) is None:
        warnings = [r.getMessage() for r in caplog.records if "nothing is offloaded for it" in r.getMessage()]
        assert len(warnings) == 1, "a twin left resident must be warned about, once"


def test_a_twin_offloaded_with_another_plan_is_refused_the_first_models_graph():
    """The graph's waits were placed for the first model's offloaded weights; the twin offloads others.

    Served the first model's graph (its guards predate the offload), the twin read its offloaded attention
    weights with no wait before them: right on the CPU's synchronous copies, a race on a GPU's copy stream.
    """
    transformers = pytest.importorskip("transformers")
    from model_zoo import tiny_decoder_config

    def tiny(seed: int):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**tiny_decoder_config())).eval()

    first, twin = tiny(0), tiny(1)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    options = {"compiler": "aot_eager"}  # the same for both: Dynamo serves a graph to the backend that compiled it
    with torch.no_grad():
        torch.compile(first, backend="prefetch_offload", options=options)(ids)  # default plan: layer 3 of 4
        prefetch_compile.offload(twin, "cpu", group_size=2)
        compiled_twin = torch.compile(twin, backend="prefetch_offload", options=options)
        with pytest.raises(RuntimeError, match=r"offloaded with another plan \(layers \[1, 3\] offloaded, 18 param"):
            compiled_twin(ids)


def test_two_models_offloaded_on_their_own_each_run_under_their_own_runtime():
    """Two offloaded instances of one class, compiled alike: a shared graph must copy each model's own layers."""
    transformers = pytest.importorskip("transformers")
    from model_zoo import tiny_decoder_config

    models, references, runtimes, compiled = [], [], [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**tiny_decoder_config())).eval()
        references.append(copy.deepcopy(model))
        runtimes.append(prefetch_compile.offload(model, "cpu", group_size=2))
        compiled.append(torch.compile(model, backend="prefetch_offload", options={"compiler": "aot_eager"}))
        models.append(model)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in range(2):
            for model, reference, runtime, function in zip(models, references, runtimes, compiled):
                before = runtime.counters.copies
                torch.testing.assert_close(function(ids).logits, reference(ids).logits, rtol=0, atol=0)
                assert runtime.counters.copies - before == len(runtime.offloaded)
    assert all(runtime.counters.ensure_misses == 0 for runtime in runtimes)


def test_quantizing_an_offloaded_model_is_refused_at_its_next_call():
    """``quantize_`` after offloading quantized each weight from its slot, which held another layer: logits off by
    0.4, no error, and the runtime went on copying the old float weights. Quantize before offloading."""
    quantization = pytest.importorskip("torchao.quantization")
    model, _, runtime = _offloaded(["linear"] * 4, group_size=2)
    compiled = torch.compile(model, backend="prefetch_offload", options={"compiler": "aot_eager"})
    x = torch.randn(3, 16)
    with torch.no_grad():
        compiled(x)
        quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
        with pytest.raises(Exception, match=r"offloaded parameter layers\.1\.\S+ was replaced on the model"):
            compiled(x)


def test_an_offloaded_parameter_replaced_by_assignment_is_refused_in_an_eager_call():
    model, _, runtime = _offloaded(["linear"] * 4, group_size=2)
    block = model.layers[1]
    name, param = next(iter(block.named_parameters()))
    module_path, _, attribute = name.rpartition(".")
    owner = block.get_submodule(module_path) if module_path else block
    setattr(owner, attribute, torch.nn.Parameter(param.detach().clone()))
    with torch.no_grad(), pytest.raises(RuntimeError, match=rf"offloaded parameter layers\.1\.{name} was replaced"):
        model(torch.randn(3, 16))


def test_a_part_compiled_on_its_own_after_a_break_is_not_advised_a_layers_path(caplog):
    """A break in the layer loop makes Dynamo compile the model's parts on their own; for a part outside the block
    list (the input projection) the warning advised options={'layers': ...}, which names a path of the part."""

    class Scale(torch.nn.Module):  # not a torch.nn class: Dynamo compiles its frame on its own
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight

    class Model(Stack):
        def __init__(self) -> None:
            super().__init__(["linear"] * 4, break_after=(1,))
            self.proj = Scale()

    compiled = torch.compile(Model(), backend="prefetch_offload", options={"compiler": "aot_eager"})
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="prefetch_compile"):
        compiled(torch.randn(3, 16))
    about_proj = [r.getMessage() for r in caplog.records if "compiles it for Scale, which has no block list" in r.getMessage()]
    assert about_proj and all("of its own" in message and "'layers'" not in message for message in about_proj)
