"""Where the bytes live after offload(): slots, host arena, device; and weight updates."""

from __future__ import annotations

import copy

import pytest
import torch

import prefetch_compile
from prefetch_compile.plan import ALIGNMENT
from toy_models import HeterogeneousStack, Stack


def storage_range(tensor):
    start = tensor.untyped_storage().data_ptr()
    return start, start + tensor.untyped_storage().nbytes()


def inside(tensor, buffer):
    low, high = storage_range(buffer)
    return low <= tensor.data_ptr() and tensor.data_ptr() + tensor.numel() * tensor.element_size() <= high


def test_offloaded_parameters_live_in_the_slot_pool_and_kept_ones_do_not():
    model = Stack(["linear", "int8", "cast", "packed"] * 2)
    runtime = prefetch_compile.offload(model, "cpu", group_size=4, num_in_group=2, prefetch_step=2)
    slots = runtime.slots.buffers
    assert len(slots) == 2
    offloaded = set(runtime.offloaded_params)
    assert offloaded == {name for name, _ in model.named_parameters() if name.split(".")[1] in {"2", "3", "6", "7"}}
    for name, param in model.named_parameters():
        in_slots = [inside(param, slot) for slot in slots]
        if name in offloaded:
            layer = int(name.split(".")[1])
            expected_slot = [2, 3, 6, 7].index(layer) % 2
            assert in_slots[expected_slot], f"{name} is not in slot {expected_slot}"
        else:
            assert not any(in_slots), f"kept parameter {name} lies in a slot"


def test_layers_sharing_a_slot_share_its_storage():
    model = Stack(["linear"] * 4)
    prefetch_compile.offload(model, "cpu", group_size=1, prefetch_step=2)
    weights = [layer.fc.weight for layer in model.layers]
    assert weights[0].data_ptr() == weights[2].data_ptr()
    assert weights[1].data_ptr() == weights[3].data_ptr()
    assert weights[0].data_ptr() != weights[1].data_ptr()


def test_a_forward_copies_only_the_layers_that_share_a_slot():
    """5 offloaded layers in 3 slots: slots 0 and 1 take turns between two layers each, slot 2 keeps its one."""
    model = Stack(["linear"] * 5)
    runtime = prefetch_compile.offload(model, "cpu", group_size=1, prefetch_step=3)
    blocks = [layer.nbytes for layer in runtime.offloaded]
    assert runtime.plan.copied_bytes_per_forward() == blocks[0] + blocks[1] + blocks[3] + blocks[4]
    runtime.counters.copies = runtime.counters.copied_bytes = 0
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, 16))
    assert runtime.counters.copied_bytes == 3 * runtime.plan.copied_bytes_per_forward()
    alone = Stack(["linear"] * 2)
    assert prefetch_compile.offload(alone, "cpu", group_size=1, prefetch_step=2).plan.copied_bytes_per_forward() == 0


def test_byte_accounting_matches_the_model():
    model = HeterogeneousStack([16, 64, 8, 48, 16])
    sizes = [sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in model.layers]
    runtime = prefetch_compile.offload(model, "cpu", group_size=2, num_in_group=1, prefetch_step=1)
    stats = runtime.stats()
    assert stats.total_layers == 4 and stats.offloaded_layers == 2
    assert stats.offloaded_bytes == sizes[1] + sizes[3]
    # One slot, as large as the larger block; each parameter padded to the alignment.
    blocks = [layer.nbytes for layer in runtime.offloaded]
    assert stats.slot_pool_bytes == max(blocks)
    assert runtime.host.nbytes == sum(blocks)
    assert all(block % ALIGNMENT == 0 for block in blocks)
    assert sum(blocks) - stats.offloaded_bytes < ALIGNMENT * 2 * 2  # two layers, two parameters each
    assert stats.host_pinned_bytes == 0  # nothing to pin on a CPU-only run
    assert stats.kept_device_bytes == sizes[0] + sizes[2]
    assert stats.device_bytes_saved == stats.offloaded_bytes - stats.slot_pool_bytes


def test_offload_logs_the_layer_list_and_what_moved(caplog):
    with caplog.at_level("INFO", logger="prefetch_compile"):
        prefetch_compile.offload(Stack(["linear"] * 4), "cpu", group_size=2)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2
    assert "layer list 'layers' with 4 blocks" in lines[0]
    assert "offloaded 2/4 layers of 'layers'" in lines[1]


def test_tied_parameters_stay_on_the_device():
    model = Stack(["linear"] * 2)
    model.layers[1].fc.weight = model.layers[0].fc.weight
    runtime = prefetch_compile.offload(model, "cpu", group_size=1)
    assert "layers.1.fc.weight" not in runtime.offloaded_params
    assert "layers.0.fc.weight" not in runtime.offloaded_params
    assert "layers.1.fc.bias" in runtime.offloaded_params


@pytest.mark.parametrize("path", ["offload", "checkpoint", "compile"])
def test_empty_parameters_stay_on_the_device_and_the_model_runs(path):
    """A parameter of no elements has no bytes to move, and a view of none has no address to check."""
    model = Stack(["linear"] * 4)
    for layer in model.layers:
        layer.empty = torch.nn.Parameter(torch.empty(0, 16), requires_grad=False)
    x = torch.randn(2, 16)
    with torch.no_grad():
        want = model(x)
        if path == "offload":
            runtime = prefetch_compile.offload(model, "cpu", group_size=2)
            got = model(x)
        elif path == "checkpoint":
            checkpoint = copy.deepcopy(model.state_dict())
            model = model.to("meta")
            runtime = prefetch_compile.load_checkpoint(model, checkpoint, device="cpu", group_size=2)
            got = torch.compile(model, backend="prefetch_offload")(x)
        else:
            got = torch.compile(model, backend="prefetch_offload", options={"group_size": 2})(x)
            runtime = prefetch_compile.runtime_of(model)
    assert "layers.1.fc.weight" in runtime.offloaded_params
    assert not any(name.endswith(".empty") for name in runtime.offloaded_params)
    torch.testing.assert_close(got, want)


def test_load_weights_reaches_offloaded_and_kept_parameters():
    model = Stack(["linear", "int8"] * 2)
    reference = copy.deepcopy(model)
    prefetch_compile.offload(model, "cpu", group_size=2)
    runtime = prefetch_compile.runtime_of(model)
    compiled = torch.compile(model, backend="prefetch_offload")
    x = torch.randn(3, 16)
    with torch.no_grad():
        compiled(x)
        for name, param in reference.named_parameters():
            if param.is_floating_point():
                param.mul_(0.5)
        update = {name: param.detach().clone() for name, param in reference.named_parameters()}
        runtime.load_weights(update)
        torch.testing.assert_close(compiled(x), reference(x))
        torch.testing.assert_close(model(x), reference(x))


def test_bad_weight_update_changes_nothing():
    model = Stack(["linear"] * 2)
    runtime = prefetch_compile.offload(model, "cpu", group_size=1)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    host_before = runtime.host.buffer.clone()
    good = torch.zeros(16, 16)
    with pytest.raises(ValueError, match=r"'layers.1.fc.bias' expects shape \(16,\) and dtype torch.float32"):
        runtime.load_weights({"layers.0.fc.weight": good, "layers.1.fc.bias": torch.zeros(17)})
    with pytest.raises(KeyError, match="'nope' is not a parameter"):
        runtime.load_weights({"layers.0.fc.weight": good, "nope": good})
    assert torch.equal(runtime.host.buffer, host_before)
    assert all(torch.equal(before[name], param) for name, param in model.named_parameters() if name not in runtime.offloaded_params)
