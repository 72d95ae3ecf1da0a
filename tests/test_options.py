"""Bad options fail early with a message naming the option and what it accepts."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prefetch_compile
from prefetch_compile.config import OptionError, PlanOptions, parse_backend_options
from toy_models import Stack


@pytest.mark.parametrize(
    "options,message",
    [
        ({"group_size": 0}, "group_size must be an integer >= 1, got 0"),
        ({"group_size": 2.5}, "group_size must be an integer >= 1, got 2.5"),
        ({"num_in_group": 5, "group_size": 4}, "num_in_group=5 must be <= group_size=4"),
        ({"prefetch_step": 0}, "prefetch_step must be an integer >= 1"),
        ({"prefetch_step": True}, "prefetch_step must be an integer >= 1, got True"),
        ({"offload_params": "mlp"}, "offload_params must be a list"),
        ({"offload_params": ["mlp", ""]}, "offload_params must be a list"),
        ({"offload_params": None}, "offload_params must be a list"),
        ({"offload_params": 3}, "offload_params must be a list"),
        ({"offload_params": []}, "offload_params=[] names no parameter: leave it out"),
        ({"compiler": "tvm"}, "compiler must be one of ('inductor', 'aot_eager', 'eager'), got 'tvm'"),
        ({"cuda_graphs": "yes"}, "cuda_graphs must be True or False"),
        ({"dump_dir": 3}, "dump_dir must be a directory path"),
        ({"layers": ""}, "layers must be the dotted path"),
        ({"chunked_copies": "yes"}, "chunked_copies must be True, False or 'auto', got 'yes'"),
        ({"chunked_copies": 1}, "chunked_copies must be True, False or 'auto', got 1"),
        ({"group_sise": 4}, "unknown prefetch_offload option(s) ['group_sise']; allowed: "),
    ],
)
def test_bad_option_is_named(options, message):
    with pytest.raises(OptionError) as error:
        parse_backend_options(options)
    assert message in str(error.value)


def test_good_options_parse():
    parsed = parse_backend_options({"group_size": 4, "num_in_group": 2, "offload_params": {"mlp", "attn"}})
    assert parsed.plan.group_size == 4 and parsed.plan.num_in_group == 2
    assert parsed.plan.offload_params == ("attn", "mlp")
    assert parsed.compile.compiler == "inductor" and parsed.compile.cuda_graphs is False
    assert parse_backend_options({"compiler": "eager"}).plan is None


def test_dump_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFETCH_COMPILE_DUMP_DIR", str(tmp_path))
    assert parse_backend_options({}).compile.dump_dir == tmp_path


def test_bad_option_through_torch_compile():
    compiled = torch.compile(Stack(["linear"] * 2), backend="prefetch_offload", options={"prefetch_stepp": 1})
    with torch.no_grad(), pytest.raises(Exception, match=r"unknown prefetch_offload option\(s\) \['prefetch_stepp'\]"):
        compiled(torch.randn(2, 16))


def test_unsupported_device_is_refused_and_model_untouched():
    model = Stack(["linear"] * 2)
    before = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(OptionError, match="device must be a CUDA device or the CPU, got meta"):
        prefetch_compile.offload(model, "meta")
    assert [p.data_ptr() for p in model.parameters()] == before
    assert prefetch_compile.runtime_of(model) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(OptionError, match="CUDA is not available"):
        prefetch_compile.offload(Stack(["linear"]), "cuda")


def test_layers_override_must_name_a_block_list():
    with pytest.raises(OptionError, match="layers='head' is a Linear"):
        prefetch_compile.offload(Stack(["linear"] * 2), "cpu", layers="head")
    with pytest.raises(OptionError, match="layers='nope' names no submodule"):
        prefetch_compile.offload(Stack(["linear"] * 2), "cpu", layers="nope")


@pytest.mark.parametrize("layers", ["head", "nope", "layer"])
def test_one_line_path_refuses_a_layers_path_the_model_lacks(layers):
    """A typo in ``layers`` used to compile the model un-offloaded, with a warning that blamed a graph break."""
    compiled = torch.compile(Stack(["linear"] * 4), backend="prefetch_offload", options={"layers": layers})
    with torch.no_grad(), pytest.raises(Exception, match=f"layers='{layers}'"):
        compiled(torch.randn(2, 16))


def test_model_without_block_list_asks_for_layers():
    with pytest.raises(OptionError, match="pass options=\\{'layers'"):
        prefetch_compile.offload(nn.Linear(4, 4), "cpu")


def test_plan_knobs_conflicting_with_offload_are_refused():
    model = Stack(["linear"] * 4)
    prefetch_compile.offload(model, "cpu", group_size=2)
    compiled = torch.compile(model, backend="prefetch_offload", options={"group_size": 4})
    conflict = "was offloaded with group_size=2, but torch.compile options ask for group_size=4"
    with torch.no_grad(), pytest.raises(Exception, match=conflict):
        compiled(torch.randn(2, 16))


def test_the_same_plan_knobs_again_are_accepted_whatever_the_placed_plan_holds_besides():
    """Only the knobs the options name must agree: the placed plan may differ in others (a disk tier turns
    chunked_copies off, which the options' default 'auto' does not contradict), and naming it explicitly works too."""
    model = Stack(["linear"] * 4)
    reference = copy.deepcopy(model)
    prefetch_compile.offload(model, "cpu", group_size=2, chunked_copies=False)
    x = torch.randn(2, 16)
    for options in ({"group_size": 2}, {"group_size": 2, "chunked_copies": False}):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="prefetch_offload", options=options)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), reference(x), rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="prefetch_offload", options={"group_size": 2, "chunked_copies": True})
    conflict = "offloaded with chunked_copies=False, but torch.compile options ask for chunked_copies=True"
    with torch.no_grad(), pytest.raises(Exception, match=conflict):
        compiled(x)


def test_offloading_twice_is_refused():
    model = Stack(["linear"] * 2)
    prefetch_compile.offload(model, "cpu", group_size=1)
    with pytest.raises(OptionError, match="already offloaded"):
        prefetch_compile.offload(model, "cpu", group_size=1)


def test_gradients_through_offloaded_weights_are_refused():
    model = Stack(["linear"] * 2)
    compiled = torch.compile(model, backend="prefetch_offload", options={"group_size": 1})
    with pytest.raises(Exception, match="prefetch_offload is for inference"):
        compiled(torch.randn(2, 16))
    model.requires_grad_(False)
    torch.testing.assert_close(compiled(torch.randn(2, 16)).shape, torch.Size([2, 4]))


def test_inductor_freezing_is_refused():
    model = Stack(["linear"] * 2)
    compiled = torch.compile(model, backend="prefetch_offload", options={"group_size": 1})
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        with pytest.raises(Exception, match="freezing is on"):
            compiled(torch.randn(2, 16))


def test_filter_fn_chooses_the_offloaded_blocks_like_quantize():
    """``filter_fn(block, fqn)`` picks blocks, as torchao's ``quantize_(model, config, filter_fn)`` picks modules."""
    model = Stack(["linear", "int8", "linear", "int8"])
    reference = copy.deepcopy(model)
    seen = []

    def only_int8(block, fqn):
        seen.append(fqn)
        return type(block).__name__ == "Int8Block"

    runtime = prefetch_compile.offload(model, "cpu", filter_fn=only_int8)
    assert seen == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert [layer.name for layer in runtime.offloaded] == ["layers.1", "layers.3"]
    compiled = torch.compile(model, backend="prefetch_offload")
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reference(x), rtol=1e-6, atol=1e-6)


def test_filter_fn_is_checked():
    with pytest.raises(OptionError, match="filter_fn must be a callable"):
        PlanOptions(filter_fn="layers.1")
    with pytest.raises(OptionError, match="offload_layers or filter_fn, not both"):
        PlanOptions(offload_layers=(1,), filter_fn=lambda block, fqn: True)


@pytest.mark.parametrize(
    "filter_fn,message",
    [
        (lambda block: True, r"filter_fn raised TypeError: .* for block 'layers.0' \(LinearBlock\); it takes the block"),
        (lambda block, fqn: 1 / 0, r"filter_fn raised ZeroDivisionError: division by zero, called as"),
        (lambda block, fqn: "no", r"filter_fn must return a bool, got 'no' for block 'layers.0' \(LinearBlock\)"),
        (lambda block, fqn: None, r"filter_fn must return a bool, got None for block 'layers.0'"),
    ],
    ids=["one-argument", "raises", "string", "none"],
)
def test_a_filter_fn_that_fails_or_answers_no_bool_is_refused_by_name(filter_fn, message):
    """Its answer is never taken for its truthiness ("no" would offload every block), and its errors name it."""
    model = Stack(["linear"] * 4)
    reference = copy.deepcopy(model)
    with pytest.raises(OptionError, match=message):
        prefetch_compile.offload(model, "cpu", filter_fn=filter_fn)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert not hasattr(model.layers[0], "_prefetch_compile_offloaded")  # refused before any block was touched
    compiled = torch.compile(model, backend="prefetch_offload", options={"filter_fn": filter_fn})
    with torch.no_grad(), pytest.raises(Exception, match=message):  # the one line: Dynamo wraps the backend's error
        compiled(torch.randn(2, 16))


@pytest.mark.parametrize(
    "width,knobs,chunked",
    [
        (2048, {}, True),  # one slot, 16 MiB blocks: "auto" chunks
        (2048, {"prefetch_step": 2}, False),  # two slots already hide each copy behind a layer
        (256, {}, False),  # 256 KiB blocks copy in microseconds: extra ops would not pay
        (256, {"chunked_copies": True}, True),
        (2048, {"chunked_copies": False}, False),
    ],
)
def test_chunked_copies_auto_chunks_where_it_pays(width, knobs, chunked):
    from prefetch_compile.plan import build_plan

    with torch.device("meta"):
        model = Stack(["linear"] * 4, width=width)
    plan = build_plan(model, PlanOptions(group_size=2, **knobs))
    assert (plan.piece_starts != (0,)) == chunked
    if chunked:  # fc.weight, fc.bias, gain, at the same offsets in every block
        assert [plan.pieces(layer) for layer in plan.offloaded][0] == plan.pieces(plan.offloaded[1])
        assert len(plan.piece_starts) == 3
