"""Writes into the tensors ``state_dict()`` returns reach the next forward, as they do without offloading.

Plain PyTorch's ``state_dict()`` returns views of the parameters, so
``model.state_dict()[name].copy_(value)`` (a common way to set weights) changes
the model. An offloaded model's ``state_dict()`` returns the host copies' bytes
instead (the true values), each on a storage of its own. Before the fix, a write there reached the slot only at
the layer's next copy: a layer already in its slot (a slot's first layer between
forwards) gave the old weights for one forward, and a layer alone in its slot
(``prefetch_step=2`` here) gave them for good, with no error.
"""

from __future__ import annotations

import copy

import pytest
import torch

import prefetch_compile
from toy_models import Stack

WRITES = {
    "mul_": lambda t: t.mul_(2.0),
    "copy_": lambda t: t.copy_(torch.linspace(-1, 1, t.numel()).reshape(t.shape)),
}


@pytest.mark.parametrize("write", WRITES)
@pytest.mark.parametrize("layer", [1, 3])
@pytest.mark.parametrize("prefetch_step", [1, 2])
@pytest.mark.parametrize("kind", ["uncompiled", "aot_eager"])
def test_write_into_state_dict_value_is_seen(kind, prefetch_step, layer, write):
    torch.manual_seed(0)
    model = Stack(["linear"] * 4)
    reference = copy.deepcopy(model)
    runtime = prefetch_compile.offload(model, "cpu", group_size=2, prefetch_step=prefetch_step)
    assert [block.name for block in runtime.offloaded] == ["layers.1", "layers.3"]
    forward = model if kind == "uncompiled" else torch.compile(model, backend="prefetch_offload", options={"compiler": kind})
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(forward(x), reference(x))
        name = next(key for key in reference.state_dict() if key.startswith(f"layers.{layer}.") and key.endswith("weight"))
        for m in (model, reference):
            WRITES[write](m.state_dict()[name])
        for _ in range(2):
            assert torch.equal(forward(x), reference(x))
        assert torch.equal(model.state_dict()[name], reference.state_dict()[name])
    assert runtime.counters.ensure_misses == 0


def test_write_into_state_dict_value_taken_under_inference_mode_is_seen():
    """Views made under inference_mode are inference tensors, whose writes PyTorch does not count."""
    torch.manual_seed(0)
    model = Stack(["linear"] * 4)
    reference = copy.deepcopy(model)
    runtime = prefetch_compile.offload(model, "cpu", group_size=2, prefetch_step=2)
    name = next(key for key in runtime.offloaded_params if key.endswith("weight"))
    x = torch.randn(3, 16)
    with torch.inference_mode():
        model(x)
        model.state_dict()[name].mul_(2.0)
        reference.get_parameter(name).mul_(2.0)
        assert torch.equal(model(x), reference(x))


def test_host_value_write_then_kept_param_edit_both_survive():
    """A write through host_value() and an in-place edit of a parameter in its slot, before one forward."""
    torch.manual_seed(0)
    model = Stack(["linear"] * 4)
    reference = copy.deepcopy(model)
    runtime = prefetch_compile.offload(model, "cpu", group_size=2, prefetch_step=2)
    x = torch.randn(3, 16)
    with torch.no_grad():
        model(x)
        names = [key for key in reference.state_dict() if key.startswith("layers.1.")]
        runtime.host_value(names[0]).add_(0.25)
        reference.get_parameter(names[0]).add_(0.25)
        model.get_parameter(names[1]).mul_(3.0)  # layer 1 is alone in its slot: kept
        reference.get_parameter(names[1]).mul_(3.0)
        assert torch.equal(model(x), reference(x))
        assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("prefetch_step", [1, 2])
def test_every_write_into_a_kept_state_dict_is_seen(prefetch_step):
    """A dict the caller keeps is watched for as long as it lives: a second write into one value is seen too."""
    torch.manual_seed(0)
    model = Stack(["linear"] * 4)
    reference = copy.deepcopy(model)
    runtime = prefetch_compile.offload(model, "cpu", group_size=2, prefetch_step=prefetch_step)
    name = next(key for key in runtime.offloaded_params if key.endswith("weight"))
    kept = model.state_dict()
    x = torch.randn(3, 16)
    with torch.no_grad():
        for factor in (2.0, -0.5, 3.0):
            kept[name].mul_(factor)
            reference.get_parameter(name).mul_(factor)
            assert torch.equal(model(x), reference(x))
    assert runtime.counters.ensure_misses == 0


def test_safetensors_save_model_and_load_model_take_an_offloaded_model(tmp_path):
    """Each state_dict() value fills a storage of its own, as safetensors' save_model and load_model require.

    They used to refuse an offloaded model ("None is covering the entire storage"):
    its values were views of one host buffer (a new-user trial).
    """
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    model = Stack(["linear"] * 4)
    reference = copy.deepcopy(model)
    prefetch_compile.offload(model, "cpu", group_size=2)
    saved = tmp_path / "offloaded.safetensors"
    safetensors_torch.save_model(model, str(saved))
    fresh = Stack(["linear"] * 4)
    safetensors_torch.load_model(fresh, str(saved))
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), reference(x))
        # And the other way: new weights into the offloaded model.
        other = Stack(["linear"] * 4)
        safetensors_torch.save_model(other, str(tmp_path / "other.safetensors"))
        safetensors_torch.load_model(model, str(tmp_path / "other.safetensors"))
        assert torch.equal(model(x), other(x))
