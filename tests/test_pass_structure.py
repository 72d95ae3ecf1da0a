"""What the prefetch pass guarantees about graph structure, checked node by node.

Two levels: the ATen graph right after the pass (exact sequences of waits,
reads and prefetches), and Inductor's final generated code (after fusion and
scheduling), replayed through a small slot-state machine.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from torch.testing import FileCheck
from torch._inductor.utils import run_and_get_code

import prefetch_compile
import prefetch_compile.backend as backend
from prefetch_compile.passes import SlotConflictError
from toy_models import Stack


@pytest.fixture
def pass_results(monkeypatch):
    """Record (graph, result) of every prefetch pass run."""
    results = []
    original = backend.run_prefetch_pass

    def recording(graph, runtime, example_inputs, sources=None):
        result = original(graph, runtime, example_inputs, sources)
        results.append((graph, result))
        return result

    monkeypatch.setattr(backend, "run_prefetch_pass", recording)
    return results


def compile_and_run(model, compiler="aot_eager", rows=3, **plan):
    prefetch_compile.offload(model, "cpu", **plan)
    compiled = torch.compile(model, backend="prefetch_offload", options={"compiler": compiler})
    with torch.no_grad():
        return compiled(torch.randn(rows, 16))


def event_sequence(graph, result):
    """The graph as a sequence of 'wait i', 'read i', 'start i' events, i an offload index (runs of reads collapsed)."""
    inserted = {op.node: op for op in result.inserted}
    readers = {}
    for reads in result.analysis.offloaded.values():
        for node in reads.readers:
            readers.setdefault(node, set()).add(reads.offload_index)
    events = []
    for node in graph.nodes:
        if node in inserted:
            events.append(f"{inserted[node].kind} {inserted[node].offload_index}")
        for offload_index in sorted(readers.get(node, ())):
            if not events or events[-1] != f"read {offload_index}":
                events.append(f"read {offload_index}")
    return events


@pytest.mark.parametrize(
    "prefetch_step,expected",
    [
        (1, [
            "wait 0", "read 0", "start 1",
            "wait 1", "read 1", "start 2",
            "wait 2", "read 2", "start 3",
            "wait 3", "read 3", "start 0",  # the last layer prefetches the first for the next call
        ]),
        (2, [
            "wait 0", "read 0", "start 2",  # two slots: each layer's slot goes to the layer two ahead
            "wait 1", "read 1", "start 3",
            "wait 2", "read 2", "start 0",
            "wait 3", "read 3", "start 1",
        ]),
    ],
)
def test_every_layer_offloaded_exact_sequence(pass_results, prefetch_step, expected):
    compile_and_run(Stack(["linear"] * 4), group_size=1, prefetch_step=prefetch_step)
    (graph, result), = pass_results
    assert event_sequence(graph, result) == expected


def test_group_pattern_offloads_last_of_each_group(pass_results):
    """group_size=3, num_in_group=1 over 6 layers: model layers 2 and 5 are offload indices 0 and 1."""
    model = Stack(["linear"] * 6)
    compile_and_run(model, group_size=3, num_in_group=1, prefetch_step=1)
    (graph, result), = pass_results
    assert event_sequence(graph, result) == ["wait 0", "read 0", "start 1", "wait 1", "read 1", "start 0"]
    offloaded_names = {node.name for reads in result.analysis.offloaded.values() for node in reads.params}
    assert len(offloaded_names) == 2 * 3  # fc.weight, fc.bias, gain of two layers


def test_weight_only_work_is_read_after_wait_and_before_start(pass_results):
    """The int8 dequantisation and the transposed copy are classified as weight-only reads."""
    compile_and_run(Stack(["int8", "transposed"]), group_size=1)
    (graph, result), = pass_results
    hows = {how for reads in result.analysis.offloaded.values() for how in reads.readers.values()}
    assert {"direct", "weight-only work", "consumer of weight-only work"} <= hows
    code = graph.python_code("self").src
    FileCheck().check("wait_prefetch").check("_to_copy").check("mul").check("mm").check("start_prefetch") \
        .check("wait_prefetch").check("aten.t.").check("clone").check("mm").check("start_prefetch").run(code)


def test_start_takes_live_values_of_the_outgoing_layer(pass_results):
    """The residual stream computed by a layer is an input of the prefetch that overwrites its slot."""
    compile_and_run(Stack(["linear"] * 2), group_size=1)
    (graph, result), = pass_results
    for op in result.inserted:
        if op.kind == "start":
            assert op.live, f"start of offload {op.offload_index} materialises nothing"
            for value in op.live:
                assert result.analysis.depends_on[value] & result.analysis.mask(op.after)


SLOT_USE = re.compile(r"\b(arg\d+_1)\b")


def check_generated_code(code: str) -> int:
    """Replay Inductor's generated ``call`` through a slot-state machine; return the number of ops seen.

    A parameter becomes readable at a wait that names it and stops being readable
    at a start that names it; any other line that touches it in between is a read.
    """
    readable: dict[str, bool] = {}
    alias_of: dict[str, str] = {}
    ops = 0
    body = code[code.index("def call(") :].splitlines()
    for line in body[1:]:
        if line and not line[0].isspace():
            break  # the end of call()
        line = line.strip()
        if line.startswith(("#", "del ", "assert_size_stride", "assert_alignment")) or not line:
            continue
        names = {alias_of.get(name, name) for name in SLOT_USE.findall(line)}
        alias = re.match(r"(buf\d+) = reinterpret_tensor\((arg\d+_1)", line)
        if alias:
            alias_of[alias.group(1)] = alias.group(2)
        names |= {alias_of[name] for name in re.findall(r"\b(buf\d+)\b", line) if name in alias_of}
        if "wait_prefetch" in line:
            ops += 1
            readable.update(dict.fromkeys(names, True))
        elif "start_prefetch" in line:
            ops += 1
            released, incoming = re.findall(r"\[[^\]]*\]", line)[:2]  # both lists of parameters it overwrites
            slot_part = released + incoming
            readable.update(dict.fromkeys({alias_of.get(n, n) for n in SLOT_USE.findall(slot_part)}, False))
        else:
            stale = [name for name in names if readable.get(name) is False]
            assert not stale, f"{line!r} reads {stale} outside their wait..start window"
    return ops


@pytest.mark.parametrize("kinds,plan,chunks", [
    (["linear", "int8", "cast", "transposed"], {"group_size": 1}, 1),
    (["packed", "linear"] * 2, {"group_size": 1, "prefetch_step": 2}, 1),
    (["linear"] * 6, {"group_size": 3, "num_in_group": 2}, 1),
    (["linear"] * 4, {"group_size": 1, "chunked_copies": True}, 3),  # fc.weight, fc.bias, gain: a chunk each
    (["packed"] * 4, {"group_size": 2, "num_in_group": 2, "chunked_copies": True}, 3),
])
def test_inductor_schedule_keeps_reads_inside_windows(kinds, plan, chunks):
    """Inductor's final code, chunked or not: every slot read stands between its wait and the start that overwrites it."""
    model = Stack(kinds)
    prefetch_compile.offload(model, "cpu", **plan)
    compiled = torch.compile(model, backend="prefetch_offload")
    with torch.no_grad():
        _, codes = run_and_get_code(compiled, torch.randn(3, 16))
    offloaded = sum(1 for index in range(len(kinds)) if index % plan["group_size"] >= plan["group_size"] - plan.get("num_in_group", 1))
    assert sum(check_generated_code(code) for code in codes) == 2 * offloaded * chunks


def test_state_machine_catches_a_read_after_start():
    """The checker itself fails on a schedule that reads a slot after overwriting it."""
    bad = "def call(args):\n    torch.ops.prefetch_compile.wait_prefetch.default([arg0_1], 0)\n" \
          "    torch.ops.prefetch_compile.start_prefetch.default([arg0_1], [], [buf1], 0)\n    kernel(arg0_1, buf2)\n"
    with pytest.raises(AssertionError, match="outside their wait..start window"):
        check_generated_code(bad)


class Interleaved(nn.Module):
    """Computes with layer 1's weight before layer 0 runs: impossible with one slot for both."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))

    def forward(self, x):
        early = (x @ self.layers[1].weight.t()).sum()
        return self.layers[1](self.layers[0](x)) + early


@pytest.mark.parametrize("chunked", [False, True])
def test_interleaved_reads_of_one_slot_are_refused(chunked):
    model = Interleaved()
    prefetch_compile.offload(model, "cpu", group_size=1, prefetch_step=1, chunked_copies=chunked)
    compiled = torch.compile(model, backend="prefetch_offload", options={"compiler": "aot_eager"})
    with torch.no_grad(), pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="share slot 0") as caught:
        compiled(torch.randn(2, 16))
    assert isinstance(caught.value.inner_exception, SlotConflictError)


def test_a_function_that_runs_the_model_twice_is_refused_with_the_way_out():
    """Two passes in one graph (classifier-free guidance) read each shared slot's layers twice, interleaved.

    The refusal names the cause and the way out, which the test then takes:
    the model compiled alone and called once per pass.
    """
    model = Stack(["linear"] * 4)
    reference = copy.deepcopy(model)
    prefetch_compile.offload(model, "cpu", group_size=2, prefetch_step=1)

    def guided(x: torch.Tensor) -> torch.Tensor:
        return model(x) - 0.5 * model(-x)

    x = torch.randn(3, 16)
    compiled = torch.compile(guided, backend="prefetch_offload", options={"compiler": "aot_eager"})
    with torch.no_grad(), pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as caught:
        compiled(x)
    assert isinstance(caught.value.inner_exception, SlotConflictError)
    assert "calls the model twice, as classifier-free guidance does: compile the model itself" in str(caught.value)
    torch._dynamo.reset()
    compiled_model = torch.compile(model, backend="prefetch_offload", options={"compiler": "aot_eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled_model(x) - 0.5 * compiled_model(-x), reference(x) - 0.5 * reference(-x))


class EarlyWeightViews(nn.Module):
    """Takes views and transposes of every layer's weights up front, as diffusers' transformers do."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        transposed = [layer.weight.t() for layer in self.layers]
        for layer, weight in zip(self.layers, transposed):
            x = torch.tanh(x @ weight + layer.bias)
        return x


@pytest.mark.parametrize("compiler", ["inductor", "aot_eager"])
def test_weight_only_views_up_front_sink_to_their_use(compiler):
    """Every layer through one slot: refused before weight-only work was sunk, exact now."""
    model = EarlyWeightViews()
    reference = copy.deepcopy(model)
    prefetch_compile.offload(model, "cpu", group_size=1, prefetch_step=1)
    compiled = torch.compile(model, backend="prefetch_offload", options={"compiler": compiler})
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reference(x), rtol=1e-6, atol=1e-6)
