"""In-place edits of offloaded parameters are kept or refused by name, never lost or spread to another layer.

Each test makes the same edit on an un-offloaded copy of the model (deep-copied
before offloading) and compares. Before the fix, every edit here was lost at the
next copy into its slot, or changed another layer's weights, without a word.

The toy stacks offload layers 1 and 3 (``group_size=2``). With one slot
(``prefetch_step=1``) they share it, and between forwards it holds layer 1, which
the last layer prefetched for the next forward: an edit of layer 1 is kept, one of
layer 3 writes over layer 1's bytes and is refused. With two slots each layer is
alone in its own, and every edit is kept.
"""

from __future__ import annotations

import copy
import re
from typing import Callable

import pytest
import torch

import prefetch_compile
from prefetch_compile import InPlaceEditError
from model_zoo import tiny_decoder_config
from toy_models import Stack

Edit = Callable[[torch.Tensor], object]

EDITS: dict[str, Edit] = {
    "mul_": lambda p: p.mul_(2),
    "copy_": lambda p: p.copy_(torch.linspace(-1, 1, p.numel()).reshape(p.shape)),
    "zero_": lambda p: p.zero_(),
    "add_": lambda p: p.add_(0.5),
    "setitem": lambda p: p.__setitem__(0, 3.0),
    "view": lambda p: p.view(-1)[:5].fill_(-2.0),
    "detach": lambda p: p.detach().mul_(-1),
    "init": lambda p: torch.nn.init.constant_(p, 0.25),
}


def _stack(prefetch_step: int):
    model = Stack(["linear"] * 4)
    reference = copy.deepcopy(model)
    runtime = prefetch_compile.offload(model, "cpu", group_size=2, prefetch_step=prefetch_step)
    assert [layer.name for layer in runtime.offloaded] == ["layers.1", "layers.3"]
    return model, reference, runtime


def _edit(edit: Edit, *params: torch.Tensor) -> None:
    with torch.no_grad():
        for param in params:
            edit(param)


def _forward(kind: str, model):
    if kind == "uncompiled":
        return model
    return torch.compile(model, backend="prefetch_offload", options={"compiler": kind})


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("kind", ["inductor", "eager", "uncompiled"])
def test_an_edit_of_the_layer_in_its_slot_reaches_the_host_copy(edit, kind):
    model, reference, _ = _stack(prefetch_step=1)
    forward, x = _forward(kind, model), torch.randn(3, 16)
    with torch.no_grad():
        _close(forward(x), reference(x))
        _edit(EDITS[edit], model.layers[1].fc.weight, reference.layers[1].fc.weight)
        for _ in range(3):  # the second and third forwards copy layer 1 in again from the host arena
            _close(forward(x), reference(x))
    assert torch.equal(model.state_dict()["layers.1.fc.weight"], reference.layers[1].fc.weight)


@pytest.mark.parametrize("edit", ["mul_", "copy_", "zero_", "setitem", "init"])
@pytest.mark.parametrize("kind", ["inductor", "eager", "uncompiled"])
def test_an_edit_over_another_layers_bytes_is_refused_by_name_and_undone(edit, kind):
    model, reference, _ = _stack(prefetch_step=1)
    forward, x = _forward(kind, model), torch.randn(3, 16)
    with torch.no_grad():
        want = reference(x)
        _close(forward(x), want)
        _edit(EDITS[edit], model.layers[3].fc.bias)
        with pytest.raises(InPlaceEditError, match=r"layers\.3\.fc\.bias: its slot held layers\.1, whose bytes"):
            forward(x)
        # Refused, not half done: layer 1's bytes come back from the host, layer 3 keeps its value.
        for _ in range(2):
            _close(forward(x), want)
        # The way to change it: load_state_dict of the edited weights.
        _edit(EDITS[edit], reference.layers[3].fc.bias)
        model.load_state_dict(reference.state_dict())
        for _ in range(2):
            _close(forward(x), reference(x))
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


@pytest.mark.parametrize("layer_1_first", [True, False])
@pytest.mark.parametrize("kind", ["inductor", "uncompiled"])
def test_edits_of_two_layers_over_the_same_slot_bytes_are_both_refused(layer_1_first, kind):
    """Layer 1 (in the slot) and layer 3 (sharing it) both edited: the bytes hold the last edit, whichever it was.

    Keeping layer 1's edit copied layer 3's values into layer 1's host copy
    when layer 3's came last (``model.apply`` with an in-place init edits every
    layer in turn), silently and for good. Both are refused, each by name, and
    both layers keep their weights. The reasons are those of the owners before
    either refusal: layer 3's bias is said to have written over layer 1's bytes
    too, not into a slot holding no layer.
    """
    model, reference, _ = _stack(prefetch_step=1)
    forward, x = _forward(kind, model), torch.randn(3, 16)
    with torch.no_grad():
        want = reference(x)
        _close(forward(x), want)
        edits = [(model.layers[1].fc.weight, 1.0), (model.layers[3].fc.weight, 3.0), (model.layers[3].fc.bias, 3.0)]
        for param, value in edits if layer_1_first else reversed(edits):
            param.fill_(value)
        with pytest.raises(InPlaceEditError) as refused:
            forward(x)
        message = str(refused.value)
        assert "layers.1.fc.weight: layers.3.fc.weight, which shares these bytes of the slot, was edited too" in message
        assert "layers.3.fc.weight: its slot held layers.1, whose bytes it changed instead" in message
        assert "layers.3.fc.bias: its slot held layers.1, whose bytes it changed instead" in message
        for _ in range(2):
            _close(forward(x), want)
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


@pytest.mark.parametrize("edit", list(EDITS))
def test_every_edit_is_kept_when_each_layer_has_its_own_slot(edit):
    model, reference, _ = _stack(prefetch_step=2)
    compiled = _forward("inductor", model)
    x = torch.randn(3, 16)
    with torch.no_grad():
        compiled(x)
        for target in (model, reference):
            _edit(EDITS[edit], target.layers[1].gain, target.layers[3].fc.weight)
        for _ in range(2):
            _close(compiled(x), reference(x))
    for name, value in reference.state_dict().items():  # the host copies hold the edits too
        assert torch.equal(model.state_dict()[name], value), name


def test_state_dict_sees_a_kept_edit_and_refuses_a_lost_one():
    model, reference, _ = _stack(prefetch_step=1)
    with torch.no_grad():
        model(torch.randn(3, 16))
    _edit(EDITS["add_"], model.layers[1].gain, reference.layers[1].gain)
    assert torch.equal(model.state_dict()["layers.1.gain"], reference.layers[1].gain)
    _edit(EDITS["add_"], model.layers[3].gain)
    with pytest.raises(InPlaceEditError, match=r"layers\.3\.gain"):
        model.state_dict()
    assert torch.equal(model.state_dict()["layers.3.gain"], reference.layers[3].gain)  # refused: unchanged
    with torch.no_grad():
        _close(model(torch.ones(2, 16)), reference(torch.ones(2, 16)))


def test_load_weights_supersedes_a_pending_edit_and_loads_are_not_taken_for_edits():
    """A value loaded for an edited parameter replaces the edit; load_state_dict's own copy into each parameter
    moves its version counter, which must not be reported as an edit at the next forward."""
    model, reference, runtime = _stack(prefetch_step=1)
    x = torch.randn(3, 16)
    with torch.no_grad():
        model(x)
        _edit(EDITS["mul_"], model.layers[3].fc.weight)  # over layer 1's bytes
        runtime.load_weights({"layers.3.fc.weight": reference.layers[3].fc.weight * 3})
        reference.layers[3].fc.weight.mul_(3)
        _close(model(x), reference(x))
        for _ in range(3):
            model.load_state_dict(reference.state_dict())
            _close(model(x), reference(x))
        model.layers[3].load_state_dict(reference.layers[3].state_dict())  # a block's own load_state_dict
        _close(model(x), reference(x))
    assert runtime.counters.ensure_misses == 1  # layer 1's bytes, refilled once after the superseded edit


def test_a_forward_without_edits_is_unaffected():
    model, reference, runtime = _stack(prefetch_step=1)
    compiled = _forward("inductor", model)
    x = torch.randn(3, 16)
    with torch.no_grad():
        for _ in range(4):
            _close(compiled(x), reference(x))
    assert runtime.counters.ensure_misses == 0
    assert runtime.edits.changed() == []


def test_moving_a_parameter_with_set_is_refused_as_a_move():
    model, _, _ = _stack(prefetch_step=1)
    with torch.no_grad():
        model.layers[1].fc.weight.set_(torch.zeros(16, 16))
        moved = r"offloaded parameter layers\.1\.fc\.weight no longer lives in its device slot"
        with pytest.raises(RuntimeError, match=moved):
            model(torch.randn(3, 16))


# ------------------------------------------------------------ a real model, the one-line path
transformers = pytest.importorskip("transformers")


def _tiny_llama():
    config = transformers.LlamaConfig(**tiny_decoder_config(num_hidden_layers=4))
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_hf_llama_one_line_path_keeps_or_refuses_each_edit():
    model = _tiny_llama()
    reference = copy.deepcopy(model)
    options = {"group_size": 2, "num_in_group": 1, "prefetch_step": 1}
    compiled = torch.compile(model, backend="prefetch_offload", options=options)
    tokens = torch.randint(0, 128, (2, 5))

    def logits(forward):
        return forward(input_ids=tokens, use_cache=False).logits

    with torch.no_grad():
        torch.testing.assert_close(logits(compiled), logits(reference), rtol=1e-4, atol=1e-4)
        runtime = prefetch_compile.runtime_of(model)
        assert [layer.name for layer in runtime.offloaded] == ["model.layers.1", "model.layers.3"]
        # Layer 1 sits in the shared slot between forwards: kept, through every form at once.
        for target in (model, reference):
            mlp = target.model.layers[1].mlp
            mlp.up_proj.weight.mul_(2)
            mlp.down_proj.weight[0].zero_()
            target.model.layers[1].input_layernorm.weight.copy_(torch.full((64,), 0.5))
        for _ in range(2):
            torch.testing.assert_close(logits(compiled), logits(reference), rtol=1e-4, atol=1e-4)
        # Layer 3 does not: refused by name, undone, and the model is right again at the next call.
        want = logits(reference)
        model.model.layers[3].mlp.up_proj.weight.mul_(2)
        refused = r"model\.layers\.3\.mlp\.up_proj\.weight: its slot held model\.layers\.1"
        with pytest.raises(InPlaceEditError, match=refused):
            logits(compiled)
        torch.testing.assert_close(logits(compiled), want, rtol=1e-4, atol=1e-4)
        reference.model.layers[3].mlp.up_proj.weight.mul_(2)
        model.load_state_dict(reference.state_dict())
        torch.testing.assert_close(logits(compiled), logits(reference), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------ tensor-subclass parameters
@pytest.mark.parametrize("prefetch_step,kept", [(2, True), (1, False)])
def test_an_edit_of_a_quantized_weights_leaf_is_kept_or_refused(prefetch_step, kept):
    """A torchao int8 weight's float scales (a leaf of the subclass parameter), edited in place."""
    pytest.importorskip("torchao.quantization")
    from prefetch_compile.leaves import get_inner
    from test_subclass_params import SHAPE, quantized_llama

    assert SHAPE.layers == 2
    model = quantized_llama("int8")
    reference = copy.deepcopy(model)
    runtime = prefetch_compile.offload(model, "cpu", group_size=1, prefetch_step=prefetch_step)
    # Between forwards the one shared slot holds layer 0; an edit of layer 1 writes over it.
    layer = runtime.offloaded[1]
    scale = next(p for p in layer.params if p.inner and p.dtype.is_floating_point and len(p.shape) >= 1)
    tokens = torch.randint(0, SHAPE.vocab, (2, 6))
    compiled = torch.compile(model, backend="prefetch_offload")
    with torch.no_grad():
        before = compiled(tokens)
        _close(before, reference(tokens))
        targets = [get_inner(dict(m.named_parameters())[scale.param_name], scale.inner) for m in (model, reference)]
        _edit(EDITS["mul_"], *(targets if kept else targets[:1]))
        if not kept:
            with pytest.raises(InPlaceEditError, match=re.escape(f"{scale.name}: its slot held layers.0")):
                compiled(tokens)
        for _ in range(2):
            _close(compiled(tokens), reference(tokens))
        assert kept != torch.allclose(compiled(tokens), before)  # a kept edit changes the logits
