"""Tensor-subclass parameters: torchao weight-only quantized weights are offloaded leaf by leaf.

The reference is the same quantized model without offload, compiled with stock
Inductor: offloading must not change a single number (the CPU copies are
synchronous, so a reader misplaced against its slot's copy reads another
layer's weights). For scale, the quantized model's own compiled-vs-eager
difference is about 2e-7 here; the tolerance below is 1e-5.
"""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import prefetch_compile
from prefetch_compile import _torch_internals
from prefetch_compile.leaves import leaf_bytes, tensor_leaves
from prefetch_compile.plan_table import plan_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import llama_like  # noqa: E402

quantization = pytest.importorskip("torchao.quantization")
from torchao.quantization.granularity import PerGroup  # noqa: E402

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
SHAPE = llama_like.tiny_shape(layers=2)
CONFIGS = {
    "int8": lambda: quantization.Int8WeightOnlyConfig(),
    # torchao's CPU int4 weight-only path: 4-bit values, stored unpacked in int8, per-group scales.
    "int4": lambda: quantization.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
}


def quantized_llama(kind: str) -> llama_like.LlamaLikeDecoder:
    """The tiny Llama with every decoder-layer Linear weight-only quantized (embedding and head stay dense)."""
    model = llama_like.build(SHAPE, "cpu", torch.float32, seed=0)
    quantization.quantize_(
        model, CONFIGS[kind](), filter_fn=lambda module, name: isinstance(module, nn.Linear) and name.startswith("layers.")
    )
    return model


def greedy(forward, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding in a fixed-length buffer: attention is causal, so the padding after position t never
    changes the logits at t, and one input shape means one compiled graph for every step."""
    length = prompt.shape[1]
    tokens = torch.cat([prompt, torch.zeros(prompt.shape[0], steps, dtype=prompt.dtype)], dim=1)
    for step in range(steps):
        tokens[:, length + step] = forward(tokens)[:, length + step - 1].argmax(-1)
    return tokens


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_llama_matches_stock_inductor(kind):
    model = quantized_llama(kind)
    stock = torch.compile(copy.deepcopy(model), backend="inductor")
    # The harshest schedule: every layer offloaded, all through one slot.
    offloaded = torch.compile(model, backend="prefetch_offload", options={"group_size": 1, "prefetch_step": 1})
    prompt = llama_like.sample_tokens(SHAPE, batch=2, seq=5)
    padded = torch.cat([prompt, torch.zeros(2, 4, dtype=prompt.dtype)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(offloaded(padded), stock(padded), **TOLERANCE)
        assert torch.equal(greedy(offloaded, prompt, 4), greedy(stock, prompt, 4))

    runtime = prefetch_compile.runtime_of(model)
    weight = model.layers[1].mlp.up_proj.weight
    assert type(weight).__module__.startswith("torchao") and runtime.locate(weight) == (1, "layers.1.mlp.up_proj.weight")
    slot = runtime.slots.buffers[0]
    for inner, leaf in tensor_leaves(weight):
        assert slot.data_ptr() <= leaf.data_ptr() < slot.data_ptr() + slot.numel(), inner  # the leaf is in the slot
        assert runtime.locate(leaf) == (1, ".".join(("layers.1.mlp.up_proj.weight", *inner)))
    in_layers = {name: param for name, param in model.named_parameters() if name.startswith("layers.")}
    assert set(runtime.offloaded_params) == set(in_layers)
    assert runtime.stats().offloaded_bytes == sum(leaf_bytes(param) for param in in_layers.values())
    rows = {row["layer"]: row for row in plan_rows(runtime.plan, dict(model.named_parameters()))}
    assert rows["layers.1"]["bytes"] == rows["layers.1"]["offloaded bytes"]  # int8 bytes, not the float32 view
    stored = {str(leaf.dtype).removeprefix("torch.") for _, leaf in tensor_leaves(weight)}
    assert "int8" in stored and set(rows["layers.1"]["dtypes"].split(",")) >= stored  # not the outer float32 alone


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("compiler", ["aot_eager", "eager"])
def test_offload_first_then_compile_interleaved_with_eager_calls(compiler, chunked):
    """Placed with offload(); Dynamo's graph (eager) takes subclass placeholders, AOT's (aot_eager) their leaves.

    Chunked, a quantized weight's leaves (qdata, scale) lie in one piece, which the ops name either way."""
    model = quantized_llama("int8")
    reference = copy.deepcopy(model)
    runtime = prefetch_compile.offload(model, "cpu", group_size=1, prefetch_step=1, chunked_copies=chunked)
    if chunked:
        weight = model.layers[1].mlp.up_proj.weight
        assert len(runtime.plan.piece_starts) == 9
        assert len({runtime.piece_of(leaf) for _, leaf in tensor_leaves(weight)} | {runtime.piece_of(weight)}) == 1
    compiled = torch.compile(model, backend="prefetch_offload", options={"compiler": compiler})
    with torch.no_grad():
        for seed in range(3):
            tokens = llama_like.sample_tokens(SHAPE, batch=2, seq=5, seed=seed)
            torch.testing.assert_close(compiled(tokens), reference(tokens), **TOLERANCE)
            torch.testing.assert_close(model(tokens), reference(tokens), **TOLERANCE)


def test_load_weights_replaces_every_leaf_of_a_quantized_weight():
    model, donor = quantized_llama("int8"), quantized_llama("int8")
    with torch.no_grad():
        donor.layers[1].mlp.down_proj.weight.qdata.neg_()
    reference = copy.deepcopy(donor)
    runtime = prefetch_compile.offload(model, "cpu", group_size=2)
    compiled = torch.compile(model, backend="prefetch_offload", options={"compiler": "aot_eager"})
    tokens = llama_like.sample_tokens(SHAPE, batch=1, seq=4)
    with torch.no_grad():
        compiled(tokens)
        runtime.load_weights({"layers.1.mlp.down_proj.weight": donor.layers[1].mlp.down_proj.weight})
        torch.testing.assert_close(compiled(tokens), reference(tokens), **TOLERANCE)


def test_load_weights_refuses_a_plain_tensor_for_a_quantized_weight_before_writing_anything():
    """The check compared the logical shape and dtype only; the write then failed on the missing leaf
    (``AttributeError: qdata``) after earlier entries were written."""
    model = quantized_llama("int8")
    runtime = prefetch_compile.offload(model, "cpu", group_size=2)
    norm = next(name for name in runtime.kept_tensors if name.endswith("norm.weight"))
    before = runtime.kept_tensors[norm].clone()
    plain = torch.zeros(runtime.offloaded_params["layers.1.mlp.down_proj.weight"].shape)
    update = {norm: torch.full_like(before, 7.0), "layers.1.mlp.down_proj.weight": plain}
    with pytest.raises(ValueError, match=r"whose leaf layers\.1\.mlp\.down_proj\.weight\.qdata is torch\.int8 .* no such leaf"):
        runtime.load_weights(update)
    assert torch.equal(runtime.kept_tensors[norm], before)


def test_placeholder_sources_follow_aot_order_with_symbolic_sizes():
    """Check the mapping against AOT's real placeholders, including the symbolic sizes of a dynamic subclass input."""
    from torch._dynamo.backends.common import aot_autograd
    from torch.testing._internal.two_tensor import TwoTensor

    weight = quantized_llama("int8").layers[0].mlp.up_proj.weight
    seen = []

    def backend(gm, example_inputs):
        fakes = [node.meta["example_value"] for node in gm.graph.nodes if node.op == "placeholder"]
        sources = _torch_internals.aot_placeholder_sources(fakes)

        def forward_compiler(aten_gm, aten_inputs):
            placeholders = [node for node in aten_gm.graph.nodes if node.op == "placeholder"]
            assert len(placeholders) == len(sources)
            for node, (index, inner) in zip(placeholders, sources):
                fake = node.meta["val"]
                if inner is None:
                    assert isinstance(fake, torch.SymInt)
                    continue
                value = example_inputs[index]
                for attr in inner:
                    value = getattr(value, attr)
                if isinstance(value, torch.Tensor):
                    assert (fake.dtype, fake.dim()) == (value.dtype, value.dim())
                    seen.append((index, inner))
                else:  # a size that Dynamo passes as an input of its own
                    assert isinstance(fake, (torch.SymInt, int))
            return aten_gm

        return aot_autograd(fw_compiler=forward_compiler)(gm, example_inputs)

    def f(x, pair):
        return nn.functional.linear(x, weight) + (pair * 2).sum()

    compiled = torch.compile(f, backend=backend, dynamic=True)
    with torch.no_grad():
        compiled(torch.randn(3, SHAPE.hidden), TwoTensor(torch.randn(5, 2), torch.randn(5, 2)))
    assert {inner for _, inner in seen} >= {("qdata",), ("scale",), ("zero_point",), ("a",), ("b",)}


class Tagged(torch.Tensor):
    """A subclass that only tags a tensor: no ``__tensor_flatten__``, so nothing says where its bytes are."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


class TaggedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.fc.weight = nn.Parameter(self.fc.weight.detach().as_subclass(Tagged))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x)) + x


class TaggedStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TaggedBlock() for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_subclass_without_tensor_flatten_stays_on_the_device(caplog):
    torch.manual_seed(0)
    model = TaggedStack()
    torch.manual_seed(0)
    reference = TaggedStack()
    x = torch.randn(3, 16)
    with caplog.at_level(logging.INFO, logger="prefetch_compile"), torch.no_grad():
        got = torch.compile(model, backend="prefetch_offload", options={"group_size": 2})(x)
    torch.testing.assert_close(got.as_subclass(torch.Tensor), reference(x).as_subclass(torch.Tensor), **TOLERANCE)
    runtime = prefetch_compile.runtime_of(model)
    assert sorted(runtime.offloaded_params) == ["layers.1.fc.bias", "layers.3.fc.bias"]
    for name in ("layers.1.fc.weight", "layers.3.fc.weight"):
        assert f"{name} stays on the device: Tagged is a tensor subclass without __tensor_flatten__" in caplog.text
