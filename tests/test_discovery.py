"""Discovery picks the stack the forward iterates over, says so, and a plan that offloads nothing says that."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prefetch_compile
from prefetch_compile.config import OptionError
from prefetch_compile.discovery import find_layer_list
from toy_models import LinearBlock, MoEStack, Stack


class Wrapped(nn.Module):
    """A single-block ModuleList wrapping the real stack (some exported models nest their body this way)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.ModuleList([Stack(["linear"] * 3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body[0](x)


class TwoTowers(nn.Module):
    """Two outermost stacks (like CLIP's text and vision encoders): the heavier one is the plan's."""

    def __init__(self) -> None:
        super().__init__()
        self.small = nn.ModuleList(LinearBlock(8) for _ in range(6))
        self.large = nn.ModuleList(LinearBlock(32) for _ in range(3))


class EncoderDecoder(nn.Module):
    """Two blocks per stack, each block with a list of three sub-layers (T5's shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(nn.ModuleList(nn.Linear(8, 8) for _ in range(2)) for _ in range(2))
        self.decoder = nn.ModuleList(nn.ModuleList(nn.Linear(8, 8) for _ in range(3)) for _ in range(2))


@pytest.mark.parametrize("num_experts", [2, 8, 64])
def test_moe_discovery_picks_the_layers_not_one_layers_experts(num_experts):
    model = MoEStack(layers=4, num_experts=num_experts)
    path, blocks = find_layer_list(model)
    assert path == "layers" and len(blocks) == 4


@pytest.mark.parametrize(
    "model,expected",
    [
        (Wrapped(), "body.0.layers"),
        (TwoTowers(), "large"),
        (EncoderDecoder(), "decoder"),
        (Stack(["linear"] * 5), "layers"),
    ],
    ids=["single-block-wrapper", "two-towers", "encoder-decoder", "plain-stack"],
)
def test_discovery_picks_the_outermost_heaviest_stack(model, expected):
    path, _ = find_layer_list(model)
    assert path == expected


def test_given_path_wins_over_discovery():
    model = MoEStack(layers=2, num_experts=8)
    path, blocks = find_layer_list(model, "layers.1.experts")
    assert path == "layers.1.experts" and len(blocks) == 8


def test_no_block_list_is_refused_with_a_hint():
    with pytest.raises(OptionError, match="found no nn.ModuleList of blocks with parameters in Linear"):
        find_layer_list(nn.Linear(4, 4))


def test_a_model_that_is_the_stack_itself_is_told_to_wrap_it_and_the_wrap_works():
    blocks = nn.Sequential(*(LinearBlock(8) for _ in range(4)))
    with pytest.raises(OptionError, match=r"itself the block stack.*nn.Sequential\(model\), and pass layers='0'"):
        find_layer_list(blocks)
    x = torch.randn(2, 8)
    expected = blocks(x)
    wrapped = nn.Sequential(blocks)
    runtime = prefetch_compile.offload(wrapped, "cpu", group_size=2, layers="0")
    assert len(runtime.offloaded) == 2
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(wrapped, backend="prefetch_offload")(x), expected)


def test_the_chosen_list_is_logged_once_with_its_count(caplog):
    with caplog.at_level("INFO", logger="prefetch_compile"):
        prefetch_compile.offload(MoEStack(layers=4, num_experts=8), "cpu", group_size=2)
    lines = [record.getMessage() for record in caplog.records if "layer list" in record.getMessage()]
    assert len(lines) == 1
    assert "layer list 'layers' with 4 blocks holding 9" in lines[0]  # 4 MoE layers hold 9x% of the bytes
    assert "found: the outermost nn.ModuleList holding the most parameters" in lines[0]


@pytest.mark.parametrize(
    "knobs,reason",
    [
        ({}, "(group_size=4, num_in_group=1), and none of its 2 blocks is"),
        ({"group_size": 1, "offload_params": ["attention"]}, "no parameter of blocks [0, 1] matches"),
    ],
    ids=["too-few-layers", "no-matching-param"],
)
def test_a_plan_that_offloads_nothing_warns(caplog, knobs, reason):
    with caplog.at_level("WARNING", logger="prefetch_compile"):
        runtime = prefetch_compile.offload(Stack(["linear"] * 2), "cpu", **knobs)
    assert runtime.plan.offloaded == ()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "the plan offloads nothing from 'layers'" in warnings[0] and reason in warnings[0]


def test_a_plan_that_saves_memory_does_not_warn(caplog):
    with caplog.at_level("WARNING", logger="prefetch_compile"):
        prefetch_compile.offload(Stack(["linear"] * 4), "cpu", group_size=2)  # two layers take turns in one slot
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize(
    "knobs",
    [{}, {"group_size": 2, "prefetch_step": 2}],
    ids=["one-layer-one-slot", "a-slot-per-layer"],
)
def test_a_plan_that_saves_no_device_memory_warns(caplog, knobs):
    """One offloaded layer, or as many slots as offloaded layers: every layer stays in its slot, nothing is saved."""
    with caplog.at_level("WARNING", logger="prefetch_compile"):
        runtime = prefetch_compile.offload(Stack(["linear"] * 4), "cpu", **knobs)
    assert runtime.plan.offloaded and runtime.stats().device_bytes_saved <= 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "the plan saves no device memory" in warnings[0]


def test_moe_experts_only_plan_keeps_router_and_mixing_on_the_device():
    model = MoEStack(layers=4, num_experts=8)
    runtime = prefetch_compile.offload(model, "cpu", group_size=2, offload_params=["experts"])
    assert runtime.plan.layer_list_path == "layers"
    assert {name.split(".")[2] for name in runtime.offloaded_params} == {"experts"}
    assert {name.split(".")[1] for name in runtime.offloaded_params} == {"1", "3"}
    assert len(runtime.offloaded_params) == 2 * 8 * 4  # 2 layers x 8 experts x (2 weights + 2 biases)
