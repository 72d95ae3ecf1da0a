"""In-place edits of offloaded parameters on a CUDA device, with and without CUDA graphs (see edits.py).

A replay runs no op body, so the look for edits is made where the runtime is
entered for it; and between forwards the first layer of each shared slot is
being prefetched on the copy stream, so an edit of it races that copy and is
refused (on the CPU copies are synchronous and the same edit is kept).
"""

from __future__ import annotations

import copy

import pytest
import torch

import prefetch_compile
from prefetch_compile import InPlaceEditError

llama_like = pytest.importorskip("llama_like")

DEVICE = "cuda"


def _offloaded_llama(prefetch_step: int, cuda_graphs: bool):
    shape = llama_like.LlamaShape(vocab=512, hidden=256, intermediate=512, heads=4, kv_heads=2, layers=6)
    model = llama_like.build(shape, device=DEVICE, dtype=torch.float32, seed=0)
    reference = copy.deepcopy(model)
    runtime = prefetch_compile.offload(model, DEVICE, group_size=2, num_in_group=1, prefetch_step=prefetch_step)
    assert [layer.name for layer in runtime.offloaded] == ["layers.1", "layers.3", "layers.5"]
    compiled = torch.compile(model, backend="prefetch_offload", options={"cuda_graphs": cuda_graphs})
    return model, reference, compiled


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _scale(*params: torch.Tensor) -> None:
    for param in params:
        param.mul_(2)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_edits_of_layers_alone_in_their_slots_are_kept(cuda_graphs):
    model, reference, compiled = _offloaded_llama(prefetch_step=3, cuda_graphs=cuda_graphs)
    x = torch.randint(0, 512, (2, 8), device=DEVICE)
    with torch.inference_mode():
        for _ in range(3):  # warm-up, capture, replay
            _close(compiled(x), reference(x))
        _scale(model.layers[3].mlp.up_proj.weight, reference.layers[3].mlp.up_proj.weight)
        model.layers[5].self_attn.o_proj.weight.zero_()
        reference.layers[5].self_attn.o_proj.weight.zero_()
        for _ in range(3):
            _close(compiled(x), reference(x))
    saved = model.state_dict()
    for name, value in reference.state_dict().items():
        assert torch.equal(saved[name].to(DEVICE), value), name


@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("layer", [1, 3])
def test_edits_in_a_shared_slot_are_refused_by_name_and_undone(cuda_graphs, layer):
    """Layer 1 is being prefetched between forwards (an edit races the copy), layers 3 and 5 are not in the slot."""
    model, reference, compiled = _offloaded_llama(prefetch_step=1, cuda_graphs=cuda_graphs)
    x = torch.randint(0, 512, (2, 8), device=DEVICE)
    with torch.inference_mode():
        want = reference(x)
        for _ in range(3):
            _close(compiled(x), want)
        _scale(model.layers[layer].mlp.up_proj.weight)
        with pytest.raises(InPlaceEditError, match=rf"layers\.{layer}\.mlp\.up_proj\.weight: its"):
            compiled(x)
        for _ in range(3):  # the replays are right again: the slot's bytes were copied in afresh
            _close(compiled(x), want)
        _scale(reference.layers[layer].mlp.up_proj.weight)
        model.load_state_dict(reference.state_dict())
        for _ in range(3):
            _close(compiled(x), reference(x))
