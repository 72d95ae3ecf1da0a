"""The README's one line on real model classes: first call, no ``offload()`` before it, same answer as the model.

Tiny-config Hugging Face and diffusers models (tests/model_zoo.py) go through
exactly ``torch.compile(model, backend="prefetch_offload", options={...})`` and
are compared with an untouched deep copy made before compiling.

Time: a CPU Inductor compile of one of these models takes 20-80 s on two cores,
so the whole matrix runs with the ``aot_eager`` inner compiler (the same
Dynamo capture, AOT functionalisation, fake-tensor re-fakification and
prefetch pass as Inductor, minus code generation), which also makes the
comparison exact. A subset runs with Inductor, the default.
"""

from __future__ import annotations

import copy

import pytest
import torch

import prefetch_compile
from model_zoo import ALL, BY_NAME, ZooModel

transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")

# Every other layer offloaded: with 2 to 4 blocks per stack, something always moves.
PLAN = {"group_size": 2, "num_in_group": 1}

# Inductor subset (20-80 s a model on two cores): a dense decoder and a diffusion transformer.
# The whole matrix passed under Inductor too when this file was written (tolerance below).
INDUCTOR_SUBSET = ["llama", "flux"]


def unique_graphs() -> int:
    """Graphs Dynamo has compiled in this process (a recompile adds one)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.fixture
def no_recompiles(monkeypatch):
    """Any Dynamo recompile raises ``RecompileError`` instead of compiling silently again."""
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)


def run_one_line(entry: ZooModel, options: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.nn.Module, int]:
    """Compile with the one line, call twice; return both outputs, the reference's, the model and the graph count."""
    model = entry.build()
    reference = copy.deepcopy(model)
    inputs = entry.inputs(torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="prefetch_offload", options=options)
    with torch.no_grad():
        before = unique_graphs()
        first = entry.output(compiled(**inputs))
        graphs = unique_graphs() - before
        second = entry.output(compiled(**inputs))
        assert unique_graphs() - before == graphs, "the second call with the same inputs compiled again"
        expected = entry.output(reference(**inputs))
    return first, second, expected, model, graphs


def assert_offloaded(model: torch.nn.Module, entry: ZooModel) -> None:
    runtime = prefetch_compile.runtime_of(model)
    assert runtime is not None, "nothing was offloaded at the first call"
    assert runtime.plan.layer_list_path == entry.layers_path
    assert runtime.stats().offloaded_layers > 0


@pytest.mark.parametrize("entry", ALL, ids=lambda entry: entry.name)
def test_one_line_first_call_matches_the_model(entry, no_recompiles):
    first, second, expected, model, graphs = run_one_line(entry, {**PLAN, "compiler": "aot_eager"})
    assert_offloaded(model, entry)
    assert graphs >= 1
    # aot_eager runs the very ATen ops eager runs, in the same order: bit-for-bit equal.
    assert torch.equal(first, expected)
    assert torch.equal(second, expected)


@pytest.mark.parametrize("prefetch_step", [1, 2])
@pytest.mark.parametrize("name", INDUCTOR_SUBSET)
def test_one_line_first_call_under_inductor(name, prefetch_step, no_recompiles):
    entry = BY_NAME[name]
    first, second, expected, model, _ = run_one_line(entry, {**PLAN, "prefetch_step": prefetch_step})
    assert_offloaded(model, entry)
    # CPU Inductor fuses and vectorises reductions (norms, softmax, matmul epilogues) in another
    # order than eager: float32 results differ by a few ulps, never more on these tiny widths.
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_every_diffusion_block_through_one_slot_under_inductor(name):
    """Issue 8 case 9: every block of Flux and SD3 through one slot was refused with SlotConflictError.

    Under Inductor the refusal came from its reorder_for_locality pass, which the backend now turns off.
    """
    entry = BY_NAME[name]
    model = entry.build()
    reference = copy.deepcopy(model)
    runtime = prefetch_compile.offload(model, "cpu", group_size=1, prefetch_step=1)
    assert runtime.plan.num_slots == 1 and len(runtime.plan.offloaded) == len(model.get_submodule(entry.layers_path))
    compiled = torch.compile(model, backend="prefetch_offload")
    inputs = entry.inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = entry.output(compiled(**inputs))
        expected = entry.output(reference(**inputs))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # CPU Inductor: a few ulps (see above)
    assert runtime.counters.ensure_misses == 0


# Families whose attention and cache code differ: Llama (shared by Mistral, Qwen2/3, Phi3),
# Gemma2 (sliding-window layers, soft-capping), GPT-2 and GPT-NeoX (their own caches). The MoE
# decoders generate in test_moe.py. Under aot_eager: an Inductor generate takes minutes on two cores.
GENERATE_CASES = [
    ("llama", "dynamic"),
    ("llama", "static"),
    ("gemma2", "dynamic"),
    ("gemma2", "static"),
    ("gpt2", "dynamic"),
    ("gpt2", "static"),
    ("gpt_neox", "dynamic"),
    ("qwen3", "static"),
]


@pytest.mark.parametrize("name,cache", GENERATE_CASES, ids=["-".join(case) for case in GENERATE_CASES])
def test_generate_with_compiled_forward_matches_the_model(name, cache):
    """HF ``generate`` calls ``self(...)``: compile ``model.forward`` so that the decoding steps are compiled."""
    entry = BY_NAME[name]
    model = entry.build()
    reference = copy.deepcopy(model)
    model.forward = torch.compile(model.forward, backend="prefetch_offload", options={**PLAN, "compiler": "aot_eager"})
    prompt = entry.inputs(torch.Generator().manual_seed(0))["input_ids"]
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    if cache == "static":
        settings["cache_implementation"] = "static"
    with torch.no_grad():
        tokens = model.generate(prompt, **settings)
        graphs = unique_graphs()
        again = model.generate(prompt, **settings)
        assert unique_graphs() == graphs, "a second generate compiled again"
        expected = reference.generate(prompt, **settings)
    assert_offloaded(model, entry)
    assert tokens.shape == (2, prompt.shape[1] + 6)
    assert torch.equal(tokens, expected) and torch.equal(again, expected)
