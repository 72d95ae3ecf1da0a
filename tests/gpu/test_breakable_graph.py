"""Breakable CUDA graphs on a GPU: capture around a host-synchronising op, replay, and failure modes."""

import re
import warnings

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from prefetch_compile.breakable_graph import BreakableCUDAGraph, BreakableGraphed, current_capture, eager_break
from toy_models import GatedMLP

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

WIDTH = 64


def _model() -> GatedMLP:
    return GatedMLP(WIDTH, depth=3).cuda().eval()


def _eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # Loose enough for a different GEMM algorithm (or TF32, if another test enabled it), far below
    # what a stale input or a skipped eager call changes.
    torch.testing.assert_close(actual, expected, rtol=2e-3, atol=2e-3)


def test_outputs_match_eager_over_calls():
    model = _model()
    graphed = BreakableGraphed(model)
    inputs = [torch.randn(8, WIDTH, device="cuda") for _ in range(5)]
    outputs = [graphed(x) for x in inputs]
    for x, out in zip(inputs, outputs):
        # Earlier outputs are clones: later replays did not overwrite them.
        _close(out, _eager(model, x))
    (capture,) = graphed.captures.values()
    assert (capture.num_graphs, capture.num_eager) == (2, 1)


def test_outputs_dropped_between_calls_are_handed_out_without_a_clone():
    model = _model()
    graphed = BreakableGraphed(model)
    addresses = []
    for _ in range(6):
        x = torch.randn(4, WIDTH, device="cuda")
        out = graphed(x)
        _close(out, _eager(model, x))
        addresses.append(out.data_ptr())
        del out
    # Call 1 is the eager warm-up, call 2 the capture, whose replay returns a clone; the
    # clone was gone by call 3, so from then on every replay returns its static output.
    assert len(set(addresses[2:])) == 1
    assert addresses[1] != addresses[2]


def test_a_kept_static_output_is_never_overwritten():
    model = _model()
    graphed = BreakableGraphed(model)
    for _ in range(3):
        graphed(torch.randn(4, WIDTH, device="cuda"))  # warm-up, capture, then static hand-outs
    kept_x = torch.randn(4, WIDTH, device="cuda")
    kept = graphed(kept_x)[1:3]  # a view of the static output, kept past the next call
    later = [torch.randn(4, WIDTH, device="cuda") for _ in range(3)]
    outputs = [graphed(x) for x in later]  # held too: each must be fresh or a clone
    _close(kept, _eager(model, kept_x)[1:3])
    for x, out in zip(later, outputs):
        _close(out, _eager(model, x))
    assert len({out.data_ptr() for out in outputs}) == len(outputs)


def test_each_input_shape_gets_its_own_capture():
    model = _model()
    graphed = BreakableGraphed(model)
    for rows in [2, 5, 2, 9, 5, 9]:
        x = torch.randn(rows, WIDTH, device="cuda")
        _close(graphed(x), _eager(model, x))
    assert len(graphed.captures) == 3
    assert all((c.num_graphs, c.num_eager) == (2, 1) for c in graphed.captures.values())


def _launches(fn) -> tuple[int, int]:
    """(kernel + graph launches, graph launches) issued by one call, from the CUDA runtime events."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [event.name for event in prof.events()]
    graphs = sum("GraphLaunch" in name for name in names)
    return sum("LaunchKernel" in name for name in names) + graphs, graphs


def test_replay_launches_fewer_kernels_than_eager():
    model = _model()
    graphed = BreakableGraphed(model)
    x = torch.randn(8, WIDTH, device="cuda")
    _eager(model, x)
    graphed(x)  # warm up and capture
    graphed(x)
    eager_launches, eager_graphs = _launches(lambda: _eager(model, x))
    replay_launches, replay_graphs = _launches(lambda: graphed(x))
    (capture,) = graphed.captures.values()
    assert eager_graphs == 0 and eager_launches >= 6  # at least the six GELUs, whatever cuBLAS reports
    assert replay_graphs == capture.num_graphs == 2
    assert replay_launches < eager_launches, (replay_launches, eager_launches)


def test_capture_inside_a_capture_raises_and_leaves_things_usable():
    model = _model()
    graphed = BreakableGraphed(model)
    x = torch.randn(8, WIDTH, device="cuda")

    with BreakableCUDAGraph() as outer:
        with pytest.raises(RuntimeError, match="already active on this thread"):
            with BreakableCUDAGraph():
                pytest.fail("a nested breakable capture must not start")
        with pytest.raises(RuntimeError, match="already active on this thread"):
            graphed(x)
    assert outer.num_graphs == 0  # its only segment captured nothing and was dropped
    outer.replay()

    static = torch.ones(4, device="cuda")
    plain = torch.cuda.CUDAGraph()
    with torch.cuda.graph(plain):
        doubled = static * 2
        with pytest.raises(RuntimeError, match="already capturing a CUDA graph"):
            with BreakableCUDAGraph():
                pytest.fail("a breakable capture must not start inside a plain capture")
        with pytest.raises(RuntimeError, match="already capturing a CUDA graph"):
            graphed(x)
    static.fill_(3.0)
    plain.replay()
    torch.testing.assert_close(doubled, torch.full_like(static, 6.0))

    with pytest.raises(ValueError, match="boom"):
        with BreakableCUDAGraph():
            _ = static * 2
            raise ValueError("boom")
    assert current_capture() is None and not torch.cuda.is_current_stream_capturing()

    assert len(graphed.captures) == 0
    for _ in range(3):
        x = torch.randn(8, WIDTH, device="cuda")
        _close(graphed(x), _eager(model, x))


def _project(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return nn.functional.gelu(x @ weight)


def test_debug_detects_a_moved_static_input():
    x = torch.randn(4, WIDTH, device="cuda")
    weight = torch.randn(WIDTH, WIDTH, device="cuda")
    graphed = BreakableGraphed(_project, static_inputs=(1,), debug=True)
    _close(graphed(x, weight), _project(x, weight))
    weight.mul_(2.0)  # updated in place: the graph reads it directly
    _close(graphed(x, weight), _project(x, weight))

    moved = weight.clone()
    expected = re.escape(f"captured at 0x{weight.data_ptr():x}, passed at 0x{moved.data_ptr():x}")
    with pytest.raises(RuntimeError, match=r"static input argument 1 moved: " + expected):
        graphed(x, moved)
    _close(graphed(x, weight), _project(x, weight))  # the error left the wrapper usable

    # Without debug, a static input at a new address gets its own capture, never a stale read.
    quiet = BreakableGraphed(_project, static_inputs=(1,))
    for _ in range(3):
        quiet(x, weight)
    tripled = weight * 3.0
    for _ in range(3):
        _close(quiet(x, tripled), _project(x, tripled))
    _close(quiet(x, weight), _project(x, weight))


@eager_break
def add_host_sum(src: torch.Tensor, out: torch.Tensor, order: list[str], tag: str) -> None:
    """Adds src's sum, read on the host (.item()), to src."""
    order.append(tag)
    out.copy_(src + src.sum().item())


def test_on_segment_end_runs_once_per_segment_while_capturing():
    capturing_at_end: list[bool] = []
    order: list[str] = []
    x = torch.zeros(4, device="cuda")
    def on_end() -> None:
        capturing_at_end.append(torch.cuda.is_current_stream_capturing())

    with BreakableCUDAGraph(on_segment_end=on_end) as cap:
        a = x * 2
        shifted = torch.empty_like(a)
        add_host_sum(a, shifted, order, "first")
        b = shifted + 1
        shifted_again = torch.empty_like(b)
        add_host_sum(b, shifted_again, order, "second")
        c = shifted_again * 3
    assert capturing_at_end == [True, True, True]
    assert (cap.num_graphs, cap.num_eager) == (3, 2)
    assert order == ["first", "second"]

    for values in ([1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0]):
        x.copy_(torch.tensor(values))
        cap.replay()
        a_ref = torch.tensor(values) * 2
        b_ref = a_ref + a_ref.sum() + 1
        torch.testing.assert_close(c.cpu(), (b_ref + b_ref.sum()) * 3)
    assert capturing_at_end == [True] * 3  # replay does not call it
    assert order == ["first", "second"] * 3

    segment_ends = []
    graphed = BreakableGraphed(_model(), on_segment_end=lambda: segment_ends.append(1))
    for rows in (4, 4, 4, 6, 6):  # each shape: an eager warm-up call, then a capture at its second call
        graphed(torch.randn(rows, WIDTH, device="cuda"))
    assert len(segment_ends) == 2 * 2  # two segments per capture, two captures


def test_empty_segments_are_skipped():
    order: list[str] = []

    @eager_break
    def note(tag: str) -> None:
        order.append(tag)

    @eager_break
    def note_twice(tag: str) -> None:
        order.append(tag)
        note(tag + "/inner")  # already eager: part of this call, not a break of its own

    ends = []
    x = torch.full((4,), 4.0, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with BreakableCUDAGraph(on_segment_end=lambda: ends.append(1)) as cap:
            note("start")
            y = x + 1
            note("a")
            note_twice("b")
            z = y * 2
            note("end")
    assert not [w for w in caught if "empty" in str(w.message)]
    assert len(ends) == 5  # [] start [y] a [] b [z] end []
    assert (cap.num_graphs, cap.num_eager) == (2, 4)
    assert order == ["start", "a", "b", "b/inner", "end"]

    order.clear()
    x.fill_(-2.0)
    cap.replay()
    assert order == ["start", "a", "b", "b/inner", "end"]
    torch.testing.assert_close(z, torch.full_like(x, -2.0))
