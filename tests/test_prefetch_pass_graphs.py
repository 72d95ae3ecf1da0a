"""The prefetch pass run directly on small ATen graphs made with ``make_fx``: no model, no backend.

Each test builds the graph of a few "layers" (matmuls with weights passed as
inputs), says which placeholders are which offloaded layer's parameters, runs
:func:`prefetch_pass` and checks the resulting code with FileCheck: the
order of waits, reads and starts is the pass's whole guarantee.
"""

from __future__ import annotations

import pytest
import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.testing import FileCheck

from prefetch_compile.ops import START, WAIT
from prefetch_compile.passes import ParamInput, SlotConflictError, prefetch_pass


def _graph(fn, *inputs: torch.Tensor) -> fx.GraphModule:
    return make_fx(fn, tracing_mode="fake")(*inputs)


def _run_pass(gm: fx.GraphModule, offloaded: dict[int, int], num_slots: int, num_offloaded: int):
    """``offloaded``: placeholder position -> offload index; every weight placeholder counts as static."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    param_inputs = {placeholders[pos]: ParamInput(index, f"layers.{index}.weight") for pos, index in offloaded.items()}
    static = set(param_inputs)

    def next_in_slot(index: int) -> int:
        following = index + num_slots
        return following if following < num_offloaded else index % num_slots

    result = prefetch_pass(
        gm.graph,
        param_inputs,
        static,
        next_in_slot=next_in_slot,
        slot_of=lambda index: index % num_slots,
        make_wait=lambda graph, params: graph.call_function(WAIT, (params,)),
        make_start=lambda graph, params, live: graph.call_function(START, (params, live)),
    )
    gm.recompile()
    return result, gm.code


def _three_layers(x, w0, w1, w2):
    for weight in (w0, w1, w2):
        x = torch.tanh(x @ weight)
    return x


def _inputs(count: int = 3):
    return [torch.randn(4, 8)] + [torch.randn(8, 8) for _ in range(count)]


def test_each_layer_is_waited_before_its_read_and_prefetches_after_it():
    """One slot, three layers: wait(0) mm tanh start; wait(1) mm ...; the last start wraps to layer 0."""
    gm = _graph(_three_layers, *_inputs())
    result, code = _run_pass(gm, {1: 0, 2: 1, 3: 2}, num_slots=1, num_offloaded=3)
    check = FileCheck()
    for weight in ("w0", "w1", "w2"):
        check.check(f"wait_prefetch.default([{weight}")
        check.check("mm.default(").check(f", {weight}").check("start_prefetch.default([")
    check.run(code)
    starts = [op for op in result.inserted if op.kind == "start"]
    assert [(op.after, op.offload_index) for op in starts] == [(2, 0), (1, 2), (0, 1)]


def test_a_start_materialises_what_is_computed_from_the_outgoing_layer():
    """The start after layer 0's last read takes that read's result: it must exist before the copy."""
    gm = _graph(_three_layers, *_inputs())
    result, _ = _run_pass(gm, {1: 0, 2: 1, 3: 2}, num_slots=1, num_offloaded=3)
    (start,) = [op for op in result.inserted if op.kind == "start" and op.after == 0]
    assert start.anchor.target is torch.ops.aten.mm.default  # the last node that reads w0
    assert start.anchor in start.live  # its result outlives the copy, so the copy takes it as input


def test_kept_layers_get_no_ops():
    gm = _graph(_three_layers, *_inputs())
    result, code = _run_pass(gm, {2: 0}, num_slots=1, num_offloaded=1)
    assert [(op.kind, op.offload_index) for op in result.inserted] == [("wait", 0), ("start", 0)]
    FileCheck().check("mm.default(").check("wait_prefetch.default([w1").check("mm.default(").check(
        "start_prefetch.default([w1"
    ).check("mm.default(").run(code)


def test_weight_only_views_taken_up_front_sink_next_to_their_use():
    """make_fx puts each ``w.t()`` where the code computed it: all at the top here."""

    def transposed_up_front(x, w0, w1):
        t0, t1 = w0.t(), w1.t()
        return torch.tanh(torch.tanh(x @ t0) @ t1)

    gm = _graph(transposed_up_front, *_inputs(2))
    _, code = _run_pass(gm, {1: 0, 2: 1}, num_slots=1, num_offloaded=2)
    FileCheck().check("wait_prefetch.default([w0").check("t.default(w0").check("mm.default(").check(
        "start_prefetch.default([w0"
    ).check("wait_prefetch.default([w1").check("t.default(w1").run(code)


def _interleaved(x, w0, w1):
    first = x @ w0
    other = x @ w1  # layer 1 read while layer 0 is still to be read again
    return torch.tanh(first @ w0) + other


def test_real_interleaving_in_one_slot_raises_slot_conflict():
    gm = _graph(_interleaved, *_inputs(2))
    with pytest.raises(SlotConflictError, match="offload indices 0 and 1 share slot 0"):
        _run_pass(gm, {1: 0, 2: 1}, num_slots=1, num_offloaded=2)


def test_two_slots_let_layers_overlap():
    gm = _graph(_interleaved, *_inputs(2))
    result, _ = _run_pass(gm, {1: 0, 2: 1}, num_slots=2, num_offloaded=2)
    assert sorted((op.kind, op.offload_index) for op in result.inserted) == [
        ("start", 0), ("start", 1), ("wait", 0), ("wait", 1)
    ]
