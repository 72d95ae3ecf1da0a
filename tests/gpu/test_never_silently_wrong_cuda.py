"""Issue 8 on a CUDA device: CUDA graphs with a KV cache, replays after Python changed the slots, weight reloads.

Every comparison here is exact (float32, the same Inductor kernels on both sides)
or token-exact, because a replay that reads the wrong slot shows as a large error,
not as rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch

import prefetch_compile

llama_like = pytest.importorskip("llama_like")

DEVICE = "cuda"


def _shape(layers: int = 6) -> "llama_like.LlamaShape":
    return llama_like.LlamaShape(vocab=512, hidden=256, intermediate=512, heads=4, kv_heads=2, layers=layers)


def _offloaded_llama(prefetch_step: int, layers: int = 6, chunked: bool = False):
    model = llama_like.build(_shape(layers), device=DEVICE, dtype=torch.float32, seed=0)
    reference = copy.deepcopy(model)
    runtime = prefetch_compile.offload(
        model, DEVICE, group_size=2, num_in_group=1, prefetch_step=prefetch_step, chunked_copies=chunked
    )
    compiled = torch.compile(model, backend="prefetch_offload", options={"cuda_graphs": True})
    return model, reference, runtime, compiled


def _tokens(batch: int = 2, seq: int = 8) -> torch.Tensor:
    return torch.randint(0, 512, (batch, seq), device=DEVICE)


def _exact(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prefetch_step,chunked", [(1, False), (2, False), (1, True)])
def test_replay_after_an_eager_block_call_and_a_raised_forward(prefetch_step, chunked):
    model, reference, runtime, compiled = _offloaded_llama(prefetch_step, chunked=chunked)
    x = _tokens()
    with torch.inference_mode():
        want = reference(x)
        for _ in range(3):
            _exact(compiled(x), want)
        # An eager call of the first offloaded block prefetches the next layer of its slot.
        block = model.layers[1]
        hidden = torch.randn(2, 8, 256, device=DEVICE)
        cos, sin = model.rotary(8, hidden.dtype)
        block(hidden, cos, sin)
        restores = runtime.counters.restores
        _exact(compiled(x), want)
        assert runtime.counters.restores > restores  # the replay put the slot back first
        # A forward that raises half way (a bad shape inside the block, after its wait).
        with pytest.raises(RuntimeError):
            block(torch.randn(2, 8, 255, device=DEVICE), cos, sin)
        _exact(compiled(x), want)
        _exact(compiled(x), want)


@pytest.mark.parametrize("prefetch_step,chunked", [(1, False), (2, False), (1, True), (2, True)])
def test_replays_copy_each_offloaded_layer_once(prefetch_step, chunked):
    """Every byte of every layer of a shared slot once per replay: one copy per layer, or one per chunk of it."""
    _, reference, runtime, compiled = _offloaded_llama(prefetch_step, layers=10, chunked=chunked)
    x = _tokens()
    shared = [layer for layer in runtime.offloaded if sum(o.slot == layer.slot for o in runtime.offloaded) > 1]
    with torch.inference_mode():
        want = reference(x)
        for _ in range(3):
            compiled(x)
        for _ in range(3):
            before, copied = runtime.counters.copies, runtime.counters.copied_bytes
            _exact(compiled(x), want)
            assert runtime.counters.copied_bytes - copied == sum(layer.nbytes for layer in shared)
            if chunked:
                assert runtime.counters.copies - before > len(shared)
            else:
                assert runtime.counters.copies - before == len(shared)
    assert runtime.counters.ensure_misses == 0 and runtime.counters.restores == 0


def test_replay_after_load_state_dict_and_state_dict_round_trip():
    model, _, runtime, compiled = _offloaded_llama(prefetch_step=1)
    other = llama_like.build(_shape(), device=DEVICE, dtype=torch.float32, seed=1)
    x = _tokens()
    with torch.inference_mode():
        for _ in range(3):
            compiled(x)
        model.load_state_dict(other.state_dict())
        _exact(compiled(x), other(x))
        _exact(compiled(x), other(x))
    saved = model.state_dict()
    for name, value in other.state_dict().items():
        assert torch.equal(saved[name].to(DEVICE), value), name


@pytest.mark.parametrize("prefetch_step", [1, 3])
def test_replay_after_a_write_into_a_state_dict_value(prefetch_step):
    """``model.state_dict()[name].mul_(2)`` writes the host copy; the next replay reads the new weights.

    At ``prefetch_step=3`` every offloaded layer is alone in its slot and never copied
    again, so without the refresh the replay would read the old weights for good.
    """
    model, reference, runtime, compiled = _offloaded_llama(prefetch_step)
    x = _tokens()
    name = next(n for n in runtime.offloaded_params if n.endswith("weight"))
    with torch.inference_mode():
        for _ in range(3):  # warm up, capture, replay
            compiled(x)
        model.state_dict()[name].mul_(2.0)
        reference.get_parameter(name).mul_(2.0)
        want = reference(x)
        _exact(compiled(x), want)
        _exact(compiled(x), want)


def test_mutated_input_is_written_back_after_replay():
    """A graph that updates a plain input tensor in place (a KV cache not marked static)."""

    class CacheWriter(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(4))

        def forward(self, x: torch.Tensor, cache: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = torch.tanh(layer(x))
            cache.index_copy_(0, position, x)
            return cache.sum(0)

    model = CacheWriter().to(DEVICE)
    reference = copy.deepcopy(model)
    prefetch_compile.offload(model, DEVICE, group_size=2)
    compiled = torch.compile(model, backend="prefetch_offload", options={"cuda_graphs": True})
    cache, reference_cache = torch.zeros(8, 64, device=DEVICE), torch.zeros(8, 64, device=DEVICE)
    with torch.inference_mode():
        for step in range(8):
            x = torch.randn(1, 64, device=DEVICE)
            position = torch.tensor([step], device=DEVICE)
            _exact(compiled(x, cache, position), reference(x, reference_cache, position))
    _exact(cache, reference_cache)


@pytest.mark.parametrize("prefetch_step,chunked", [(1, False), (2, False), (1, True)])
def test_hf_generate_with_static_cache_under_cuda_graphs(prefetch_step, chunked):
    """The README's one line on model.forward, HF generate with a static KV cache: tokens equal resident compiled."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(DEVICE).eval()
    resident = copy.deepcopy(model)
    resident.forward = torch.compile(resident.forward)
    model.forward = torch.compile(
        model.forward,
        backend="prefetch_offload",
        options={
            "group_size": 2, "num_in_group": 1, "prefetch_step": prefetch_step, "chunked_copies": chunked, "cuda_graphs": True,
        },
    )
    prompt = torch.randint(0, 512, (1, 12), device=DEVICE)
    settings = dict(max_new_tokens=24, do_sample=False, cache_implementation="static")
    with torch.inference_mode():
        want = resident.generate(prompt, **settings)
        got = model.generate(prompt, **settings)
        again = model.generate(prompt, **settings)  # a second generate reuses (or re-makes) the cache
    runtime = prefetch_compile.runtime_of(model)
    assert runtime is not None and runtime.stats().offloaded_layers == 3
    assert got.tolist() == want.tolist()
    assert again.tolist() == want.tolist()
