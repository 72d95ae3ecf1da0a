"""The prefetch pass run directly on small ATen graphs made with ``make_fx``: no model, no backend.

Each test builds the graph of a few "layers" (matmuls with weights passed as
inputs), says which placeholders are which offloaded layer's parameters (and,
for chunked copies, which piece of the layer's block holds each), runs
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


def _run_pass(
    gm: fx.GraphModule,
    offloaded: dict[int, int | tuple[int, int]],
    num_slots: int,
    num_offloaded: int,
    piece_bytes: tuple[int, ...] = (1,),
):
    """``offloaded``: placeholder position -> offload index, or (offload index, piece) when every block has pieces
    of ``piece_bytes``; every weight placeholder counts as static and is named after its placeholder."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    param_inputs = {}
    for position, where in offloaded.items():
        index, piece = where if isinstance(where, tuple) else (where, 0)
        param_inputs[placeholders[position]] = ParamInput(index, f"layers.{index}.{placeholders[position].name}", piece)
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
        piece_bytes=lambda index: piece_bytes,
        make_wait=lambda graph, params: graph.call_function(WAIT, (params,)),
        make_start=lambda graph, released, incoming, live: graph.call_function(START, (released, incoming, live)),
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


# ------------------------------------------------------------------ chunked copies
def _decoder_block(x, norm, q, k, up, down):
    """A decoder-shaped layer: a norm gain, two attention-like projections, an MLP; read in that order."""
    h = x * norm
    x = x + torch.tanh(h @ q) + torch.tanh(h @ k)
    return x + torch.relu(x @ up) @ down


def _two_blocks(x, *weights):
    return _decoder_block(_decoder_block(x, *weights[:5]), *weights[5:])


def _block_weights():
    return [torch.randn(8), torch.randn(8, 8), torch.randn(8, 8), torch.randn(8, 16), torch.randn(16, 8)]


# float32 bytes of norm, q, k, up, down: a quarter of the block is 392 bytes, so norm and q share a chunk.
BLOCK_PIECES = (32, 256, 256, 512, 512)


def _readers_of(result, gm):
    """Each offloaded parameter placeholder -> the nodes that read it (directly, through views or weight-only work)."""
    by_name = {f"layers.{info.offload_index}.{node.name}": node for node, info in _param_inputs(gm, result).items()}
    readers: dict[fx.Node, list[fx.Node]] = {node: [] for node in by_name.values()}
    for node, reads in result.analysis.reads.items():
        for _, name, _ in reads:
            readers[by_name[name]].append(node)
    return readers


def _param_inputs(gm, result):
    return {node: info for layer in result.analysis.offloaded.values() for node in layer.params
            for info in [_info(result, node)]}


def _info(result, node):
    for layer in result.analysis.offloaded.values():
        for piece in layer.pieces.values():
            if node in piece.params:
                return ParamInput(layer.offload_index, f"layers.{layer.offload_index}.{node.name}", piece.piece)
    raise AssertionError(node)


def check_chunked_schedule(gm, result) -> None:
    """The pass's guarantee, op by op: each reader of a chunk stands after the chunk's wait; each start stands after
    the last reader of the bytes it overwrites (its released parameters) and before the wait of what it brings in."""
    position = {node: index for index, node in enumerate(gm.graph.nodes)}
    readers = _readers_of(result, gm)
    waits = {}
    for op in result.inserted:
        if op.kind == "wait":
            for param in op.node.args[0]:
                assert param not in waits, f"{param} waited for twice"
                waits[param] = op.node
                assert all(position[reader] > position[op.node] for reader in readers[param]), (
                    f"a reader of {param} stands before its wait {op.node}"
                )
    released = set()
    for op in result.inserted:
        if op.kind != "start":
            continue
        outgoing, incoming, _ = op.node.args
        for param in outgoing:
            assert param not in released, f"{param} released twice"
            released.add(param)
            assert all(position[reader] < position[op.node] for reader in readers[param]), (
                f"{op.node} overwrites {param} before its last reader"
            )
        for param in incoming:
            wait = waits[param]
            wrapped = all(position[reader] < position[op.node] for reader in readers[param])  # the next forward's
            assert wrapped or position[wait] > position[op.node], f"{param} is waited for before {op.node} brings it in"
    assert released == set(waits), "every waited-for parameter is released once"


def test_chunked_copies_move_each_piece_after_its_last_reader():
    """One slot, two decoder-like layers of five pieces: four chunks per layer, each copied once the outgoing layer's
    same pieces are read, each awaited right before its first reader."""
    gm = _graph(_two_blocks, torch.randn(4, 8), *_block_weights(), *_block_weights())
    offloaded = {1 + 5 * layer + piece: (layer, piece) for layer in range(2) for piece in range(5)}
    result, code = _run_pass(gm, offloaded, num_slots=1, num_offloaded=2, piece_bytes=BLOCK_PIECES)
    check_chunked_schedule(gm, result)
    starts = sorted((op.after, op.offload_index, list(op.pieces)) for op in result.inserted if op.kind == "start")
    assert starts == [(0, 1, [0, 1]), (0, 1, [2]), (0, 1, [3]), (0, 1, [4]), (1, 0, [0, 1]), (1, 0, [2]), (1, 0, [3]), (1, 0, [4])]
    check = FileCheck()
    for layer, other in ((0, 1), (1, 0)):
        names = [f"arg{1 + 5 * layer + piece}_1" for piece in range(5)]
        incoming = [f"arg{1 + 5 * other + piece}_1" for piece in range(5)]
        check.check(f"wait_prefetch.default([{names[0]}, {names[1]}])").check(f"mul.Tensor(arg0_1, {names[0]})" if layer == 0 else "mul.Tensor(")
        check.check(f", {names[1]})").check(f"start_prefetch.default([{names[0]}, {names[1]}], [{incoming[0]}, {incoming[1]}]")
        check.check(f"wait_prefetch.default([{names[2]}])").check(f", {names[2]})").check(f"start_prefetch.default([{names[2]}], [{incoming[2]}]")
        check.check(f"wait_prefetch.default([{names[3]}])").check(f", {names[3]})").check(f"start_prefetch.default([{names[3]}], [{incoming[3]}]")
        check.check(f"wait_prefetch.default([{names[4]}])").check(f", {names[4]})").check(f"start_prefetch.default([{names[4]}], [{incoming[4]}]")
    check.run(code)


def test_chunks_follow_first_use_not_byte_order():
    """A block packed q, k, up, down, norm (Hugging Face registers norms last) but read norm first: the norm's piece
    is waited for first and released first, and it merges with nothing (no neighbour in the block is read next)."""
    gm = _graph(_two_blocks, torch.randn(4, 8), *_block_weights(), *_block_weights())
    packed_last = {0: 4, 1: 0, 2: 1, 3: 2, 4: 3}  # weight argument -> piece
    offloaded = {1 + 5 * layer + arg: (layer, packed_last[arg]) for layer in range(2) for arg in range(5)}
    result, code = _run_pass(gm, offloaded, num_slots=1, num_offloaded=2, piece_bytes=(256, 256, 512, 512, 32))
    check_chunked_schedule(gm, result)
    waits = [(op.offload_index, op.pieces) for op in result.inserted if op.kind == "wait"]
    assert waits[:4] == [(0, range(4, 5)), (0, range(0, 1)), (0, range(1, 2)), (0, range(2, 3))]
    FileCheck().check("wait_prefetch.default([arg1_1])").check("mul.Tensor(arg0_1, arg1_1)").check(
        "start_prefetch.default([arg1_1], [arg6_1]"
    ).check("wait_prefetch.default([arg2_1])").run(code)


def test_a_layer_alone_in_its_slot_keeps_one_wait_and_one_start():
    """Never copied, so chunking it would only cost ops."""
    gm = _graph(_decoder_block, torch.randn(4, 8), *_block_weights())
    result, _ = _run_pass(gm, {1 + piece: (0, piece) for piece in range(5)}, num_slots=1, num_offloaded=1, piece_bytes=BLOCK_PIECES)
    assert [(op.kind, op.pieces, len(op.node.args[0])) for op in result.inserted] == [("wait", None, 5), ("start", None, 5)]


def test_two_slots_chunk_each_slot_and_wrap_around():
    """Four layers in two slots: layer i's chunks bring in layer i + 2's, the last two wrap to the first two."""
    weights = [w for _ in range(4) for w in _block_weights()]

    def four_blocks(x, *weights):
        for layer in range(4):
            x = _decoder_block(x, *weights[5 * layer : 5 * layer + 5])
        return x

    gm = _graph(four_blocks, torch.randn(4, 8), *weights)
    offloaded = {1 + 5 * layer + piece: (layer, piece) for layer in range(4) for piece in range(5)}
    result, _ = _run_pass(gm, offloaded, num_slots=2, num_offloaded=4, piece_bytes=BLOCK_PIECES)
    check_chunked_schedule(gm, result)
    pairs = {(op.after, op.offload_index) for op in result.inserted if op.kind == "start"}
    assert pairs == {(0, 2), (1, 3), (2, 0), (3, 1)}
    assert sum(op.kind == "start" for op in result.inserted) == 4 * 4


def test_interleaved_reads_of_one_slot_are_refused_with_chunks_too():
    gm = _graph(_interleaved, *_inputs(2))
    with pytest.raises(SlotConflictError, match="offload indices 0 and 1 share slot 0"):
        _run_pass(gm, {1: (0, 0), 2: (1, 0)}, num_slots=1, num_offloaded=2, piece_bytes=(256, 256))


def test_the_checker_catches_a_start_before_the_last_reader():
    """check_chunked_schedule fails on a graph whose start was moved above a reader of what it overwrites."""
    gm = _graph(_two_blocks, torch.randn(4, 8), *_block_weights(), *_block_weights())
    offloaded = {1 + 5 * layer + piece: (layer, piece) for layer in range(2) for piece in range(5)}
    result, _ = _run_pass(gm, offloaded, num_slots=1, num_offloaded=2, piece_bytes=BLOCK_PIECES)
    start = next(op for op in result.inserted if op.kind == "start" and op.after == 0 and op.pieces == range(4, 5))
    start.anchor.prepend(start.node)  # now before the mm that reads layer 0's down weight
    with pytest.raises(AssertionError, match="before its last reader"):
        check_chunked_schedule(gm, result)
