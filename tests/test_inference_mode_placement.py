"""Offloading under ``torch.inference_mode()``, and models built under it.

Tensors made under inference_mode are inference tensors, which have no version
counter, and the runtime sees in-place edits of offloaded parameters and writes
into the host arena through version counters (``edits.py``). Before the fix,
``offload()`` or ``load_checkpoint()`` called under inference_mode, and the
README's one line on a model built under it, all failed at the first call with
PyTorch's "Inference tensors do not track version counter". Now the runtime's
own tensors are made outside inference_mode whatever the caller's mode, and a
model whose parameters are inference tensors is refused, by name, before
anything moves: an edit of such a parameter could not be seen.
"""

from __future__ import annotations

import copy

import pytest
import torch

import prefetch_compile
from prefetch_compile import InPlaceEditError
from toy_models import Stack


def _edits_are_seen(model, reference, runtime) -> None:
    """An edit of the layer in the one slot is kept; one of the layer it shares the slot with is refused."""
    x = torch.randn(3, 16)
    with torch.inference_mode():
        assert torch.equal(model(x), reference(x))
        for m in (model, reference):
            m.layers[1].fc.weight.mul_(2)
        for _ in range(2):
            assert torch.equal(model(x), reference(x))
        model.layers[3].fc.weight.add_(1)
        with pytest.raises(InPlaceEditError, match=r"layers\.3\.fc\.weight"):
            model(x)
        assert torch.equal(model(x), reference(x))  # the refused edit was undone
    assert not runtime.host.buffer.is_inference()


def test_offload_under_inference_mode_watches_edits():
    torch.manual_seed(0)
    model = Stack(["linear"] * 4)
    reference = copy.deepcopy(model)
    with torch.inference_mode():
        runtime = prefetch_compile.offload(model, "cpu", group_size=2, prefetch_step=1)
    assert not any(param.is_inference() for param in model.parameters())
    _edits_are_seen(model, reference, runtime)


def test_load_checkpoint_under_inference_mode_watches_edits():
    torch.manual_seed(0)
    original = Stack(["linear"] * 4)
    with torch.device("meta"):
        model = Stack(["linear"] * 4)
    with torch.inference_mode():
        runtime = prefetch_compile.load_checkpoint(model, original.state_dict(), "cpu", group_size=2, prefetch_step=1)
    assert not any(param.is_inference() for param in model.parameters())
    _edits_are_seen(model, copy.deepcopy(original), runtime)


def test_one_line_compile_under_inference_mode_watches_edits():
    torch.manual_seed(0)
    model = Stack(["linear"] * 4)
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="prefetch_offload", options={"group_size": 2, "compiler": "eager"})
    x = torch.randn(3, 16)
    with torch.inference_mode():
        assert torch.equal(compiled(x), reference(x))  # offloads here, under inference_mode
        for m in (model, reference):
            m.layers[1].fc.weight.mul_(2)
        for _ in range(2):
            assert torch.equal(compiled(x), reference(x))


@pytest.mark.parametrize("path", ["offload", "one line"])
def test_model_built_under_inference_mode_is_refused_by_name_and_left_as_it_was(path):
    torch.manual_seed(0)
    with torch.inference_mode():
        model = Stack(["linear"] * 4)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    x = torch.randn(3, 16)
    with pytest.raises(Exception, match=r"layers\.1\.\w+ is an inference tensor .* build or load the model outside inference_mode"):
        if path == "offload":
            prefetch_compile.offload(model, "cpu", group_size=2)
        else:
            with torch.inference_mode():
                torch.compile(model, backend="prefetch_offload", options={"group_size": 2, "compiler": "eager"})(x)
    assert prefetch_compile.runtime_of(model) is None
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
