"""Mixture-of-experts models with only the experts offloaded (router, attention and shared expert kept).

HF transformers 5 stores each layer's experts as two 3-D parameters and routes
tokens with ``experts_implementation``: ``grouped_mm`` (the default; one
grouped matmul, no data-dependent control flow) or ``eager`` (a Python loop
over the experts that received tokens, found with ``nonzero``: Dynamo breaks
the graph there). Both must give the un-offloaded model's logits and greedy
tokens through the one-line path; the toy ``MoEStack`` covers the
``ModuleList``-of-experts layout that older checkpoints and other libraries use.
"""

from __future__ import annotations

import copy

import pytest
import torch

import prefetch_compile
from model_zoo import moe
from toy_models import MoEStack

pytest.importorskip("transformers")

EXPERTS_ONLY = {"group_size": 2, "num_in_group": 1, "offload_params": ["experts"]}
ROUTINGS = ["grouped_mm", "eager"]


def assert_only_experts_offloaded(model: torch.nn.Module, layers_path: str) -> None:
    """Only experts left the device, from blocks 1 and 3 of the list at ``layers_path`` (relative to the root offloaded)."""
    runtime = prefetch_compile.runtime_of(model)
    assert runtime is not None
    names = set(runtime.offloaded_params)
    assert names and all(".experts." in name for name in names), names
    # With graph breaks the backend offloads the innermost frame module owning the stack: HF's
    # inner MixtralModel ("layers") instead of MixtralForCausalLM ("model.layers"); same blocks.
    assert runtime.plan.layer_list_path.endswith(layers_path)
    assert [layer.index for layer in runtime.plan.offloaded] == [1, 3]


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_hf_moe_experts_only_logits_and_greedy_tokens(name, routing):
    entry = moe(name, experts_implementation=routing)
    model = entry.build()
    reference = copy.deepcopy(model)
    model.forward = torch.compile(model.forward, backend="prefetch_offload", options={**EXPERTS_ONLY, "compiler": "aot_eager"})
    prompt = entry.inputs(torch.Generator().manual_seed(0))["input_ids"]
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        logits = model(input_ids=prompt).logits
        expected_logits = reference(input_ids=prompt).logits
        tokens = model.generate(prompt, **settings)
        expected_tokens = reference.generate(prompt, **settings)
    assert_only_experts_offloaded(model, "layers")
    # aot_eager runs eager's ATen ops: bit-for-bit equal, graph breaks or not.
    assert torch.equal(logits, expected_logits)
    assert torch.equal(tokens, expected_tokens)


def test_hf_mixtral_experts_only_under_inductor():
    entry = moe("mixtral")
    model = entry.build()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="prefetch_offload", options=EXPERTS_ONLY)
    prompt = entry.inputs(torch.Generator().manual_seed(0))["input_ids"]
    with torch.no_grad():
        logits = compiled(input_ids=prompt).logits
        expected = reference(input_ids=prompt).logits
    assert_only_experts_offloaded(model, "layers")
    # CPU Inductor reorders float32 reductions: a few ulps apart.
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "sparse",
    [False, True],  # nonzero routing breaks the graph inside each block: the model, not a block, is offloaded
    ids=["dense-routing", "nonzero-routing"],
)
def test_toy_moe_with_a_modulelist_of_experts(sparse):
    model = MoEStack(layers=4, num_experts=8, sparse=sparse).eval()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="prefetch_offload", options={**EXPERTS_ONLY, "compiler": "aot_eager"})
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        first = compiled(x)
        second = compiled(x)
        expected = reference(x)
    assert_only_experts_offloaded(model, "layers")
    assert torch.equal(first, expected) and torch.equal(second, expected)
