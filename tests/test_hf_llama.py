"""A Hugging Face Llama (tiny config, random weights): logits and greedy generation match the original."""

from __future__ import annotations

import copy

import pytest
import torch

import prefetch_compile
from model_zoo import tiny_decoder_config

transformers = pytest.importorskip("transformers")


def tiny_llama(layers: int = 4):
    config = transformers.LlamaConfig(**tiny_decoder_config(num_hidden_layers=layers))
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def logits_of(model):
    """The logits of every position of a prefix, without a KV cache."""
    return lambda tokens: model(input_ids=tokens, use_cache=False).logits


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
    compiled_logits = logits_of(torch.compile(model, backend="prefetch_offload"))
    reference_logits = logits_of(reference)
    prompt = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(compiled_logits(prompt), reference_logits(prompt), rtol=1e-4, atol=1e-4)
        assert torch.equal(greedy(compiled_logits, prompt, 6), greedy(reference_logits, prompt, 6))


@pytest.mark.parametrize("compiler", ["inductor", "aot_eager"])
def test_tiny_llama_with_chunked_copies_through_the_one_liner(compiler):
    """The README line with chunked_copies: three layers take turns in one slot, each copied in chunks ordered by
    first use (HF registers the norms after the MLP but reads input_layernorm first); logits and greedy tokens
    equal the un-offloaded model's, and every byte of every offloaded layer moves once per forward."""
    model = tiny_llama(layers=6)
    reference = copy.deepcopy(model)
    options = {"group_size": 2, "num_in_group": 1, "prefetch_step": 1, "chunked_copies": True, "compiler": compiler}
    compiled_logits = logits_of(torch.compile(model, backend="prefetch_offload", options=options))
    reference_logits = logits_of(reference)
    prompt = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(compiled_logits(prompt), reference_logits(prompt), rtol=1e-4, atol=1e-4)
        runtime = prefetch_compile.runtime_of(model)
        assert runtime.stats().offloaded_layers == 3 and len(runtime.plan.piece_starts) == 9
        copies, copied = runtime.counters.copies, runtime.counters.copied_bytes
        torch.testing.assert_close(compiled_logits(prompt), reference_logits(prompt), rtol=1e-4, atol=1e-4)
        assert runtime.counters.copied_bytes - copied == sum(layer.nbytes for layer in runtime.offloaded)
        assert runtime.counters.copies - copies > 3 * 2  # several chunks per layer
        assert torch.equal(greedy(compiled_logits, prompt, 3), greedy(reference_logits, prompt, 3))
    assert runtime.counters.ensure_misses == 0


def test_the_one_liner_with_dynamic_shapes_on_its_first_call():
    """``torch.compile(model.forward, ..., dynamic=True)`` without offload() first: AOT's tensorify pass restarts
    Dynamo's analysis after the backend offloaded the model, and the restarted trace, which now sees the block
    hooks, failed with SpeculationLogDivergence. Greedy generate with a KV cache, two prompt lengths, equals the
    un-offloaded model's."""
    model = tiny_llama()
    reference = copy.deepcopy(model)
    options = {"group_size": 2, "num_in_group": 1, "prefetch_step": 1}
    model.forward = torch.compile(model.forward, backend="prefetch_offload", dynamic=True, options=options)
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.inference_mode():
        for length in (5, 9):
            prompt = torch.randint(0, 128, (1, length))
            assert torch.equal(model.generate(prompt, **settings), reference.generate(prompt, **settings))
    assert prefetch_compile.runtime_of(model).stats().offloaded_layers == 2


def test_load_weights_takes_a_tied_models_state_dict_under_either_name():
    """``state_dict()`` lists a tied embedding twice (``lm_head.weight`` too): load_weights takes it back as it is."""
    config = transformers.LlamaConfig(**tiny_decoder_config(num_hidden_layers=4, tie_word_embeddings=True))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    torch.manual_seed(1)
    other = transformers.LlamaForCausalLM(config).eval()
    runtime = prefetch_compile.offload(model, "cpu", group_size=2)
    state = other.state_dict()
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    runtime.load_weights(state)
    tokens = torch.randint(0, config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    compiled = torch.compile(model, backend="prefetch_offload")
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens).logits, other(tokens).logits, rtol=1e-5, atol=1e-5)
    runtime.load_weights({"lm_head.weight": state["lm_head.weight"] * 2})  # the alias alone
    assert torch.equal(model.model.embed_tokens.weight, state["model.embed_tokens.weight"] * 2)
    untied = {**state, "lm_head.weight": state["lm_head.weight"] + 1}
    with pytest.raises(ValueError, match="'model.embed_tokens.weight' and 'lm_head.weight' are one tied tensor"):
        runtime.load_weights(untied)
    assert torch.equal(model.model.embed_tokens.weight, state["model.embed_tokens.weight"] * 2)  # nothing written
