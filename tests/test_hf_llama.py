"""A Hugging Face Llama (tiny config, random weights): logits and greedy generation match the original."""

from __future__ import annotations

import copy

import pytest
import torch

import prefetch_compile
from model_zoo import tiny_decoder_config

transformers = pytest.importorskip("transformers")


def tiny_llama():
    config = transformers.LlamaConfig(**tiny_decoder_config())
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def greedy(forward, prompt, steps):
    """Greedy decoding without a KV cache: each step reruns the whole prefix."""
    tokens = prompt
    for _ in range(steps):
        logits = forward(tokens)
        tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
    return tokens


@pytest.mark.parametrize("prefetch_step", [1, 2])
def test_tiny_llama_logits_and_greedy_generation(prefetch_step):
    model = tiny_llama()
    reference = copy.deepcopy(model)
    runtime = prefetch_compile.offload(model, "cpu", group_size=2, num_in_group=1, prefetch_step=prefetch_step)
    assert runtime.plan.layer_list_path == "model.layers"
    assert runtime.stats().offloaded_layers == 2
    compiled = torch.compile(model, backend="prefetch_offload")

    def compiled_logits(tokens):
        return compiled(input_ids=tokens, use_cache=False).logits

    def reference_logits(tokens):
        return reference(input_ids=tokens, use_cache=False).logits

    prompt = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(compiled_logits(prompt), reference_logits(prompt), rtol=1e-4, atol=1e-4)
        assert torch.equal(greedy(compiled_logits, prompt, 6), greedy(reference_logits, prompt, 6))
