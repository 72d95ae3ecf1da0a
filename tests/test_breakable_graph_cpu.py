"""Breakable CUDA graphs without CUDA: the decorator and the wrapper fall back to plain eager calls."""

import pytest
import torch

from prefetch_compile.breakable_graph import BreakableCUDAGraph, BreakableGraphed, _Handout, current_capture, eager_break
from toy_models import GatedMLP, scale_by_positive_fraction


@pytest.fixture
def no_cuda(monkeypatch):
    """Behave as on a CPU-only machine even where a GPU is present."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_decorator_outside_capture_returns_the_result():
    calls = []

    @eager_break
    def add(a, b, *, extra=0):
        calls.append((a, b, extra))
        return a + b + extra

    assert current_capture() is None
    assert add(2, 3, extra=4) == 9
    assert calls == [(2, 3, 4)]
    assert add.__name__ == "add"

    x = torch.arange(6.0) - 2.0
    out = torch.empty_like(x)
    assert scale_by_positive_fraction(x, out) is out
    torch.testing.assert_close(out, x * 3 / 6)


def test_breakable_capture_without_cuda_raises(no_cuda):
    with pytest.raises(RuntimeError, match=r"needs a CUDA device.*is_available\(\) is False"):
        with BreakableCUDAGraph():
            pytest.fail("the body must not run without CUDA")
    assert current_capture() is None
    # Nothing half-entered: the same thread can still try again and gets the same clear error.
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        BreakableCUDAGraph().__enter__()
    assert current_capture() is None


def test_wrapper_runs_eagerly_without_cuda(no_cuda):
    model = GatedMLP().eval()
    calls = []

    def forward(x: torch.Tensor, *, shift: float) -> torch.Tensor:
        calls.append(x.shape)
        return model(x + shift)

    graphed = BreakableGraphed(forward, debug=True, warmup=2)
    for rows, shift in [(3, 0.0), (3, 0.5), (5, -1.0)]:
        x = torch.randn(rows, 16)
        with torch.no_grad():
            expected = model(x + shift)
            actual = graphed(x, shift=shift)
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    # One eager run per call: no warmup, no capture, nothing recorded.
    assert calls == [torch.Size([3, 16]), torch.Size([3, 16]), torch.Size([5, 16])]
    assert len(graphed.captures) == 0


def test_wrapper_runs_cpu_tensors_eagerly():
    """CPU tensors cannot feed a CUDA graph, so even with a GPU present the call stays eager."""
    graphed = BreakableGraphed(lambda a, b: (a * b, [a + b]))
    a, b = torch.randn(4), torch.randn(4)
    product, (total,) = graphed(a, b)
    torch.testing.assert_close(product, a * b, rtol=0, atol=0)
    torch.testing.assert_close(total, a + b, rtol=0, atol=0)
    assert len(graphed.captures) == 0


def test_wrapper_rejects_negative_warmup():
    with pytest.raises(ValueError, match="warmup must be >= 0"):
        BreakableGraphed(lambda x: x, warmup=-1)


def _replay(handout, static: torch.Tensor, value: float) -> torch.Tensor | None:
    """What one replay of a graph whose static output is ``static`` returns, or None where it must run eagerly."""
    if handout.held():
        return None
    static.fill_(value)  # the replay rewrites its output in place
    return handout.hand_out(static)


def test_handout_clones_until_the_caller_drops_outputs_then_hands_out_the_static_one():
    static = torch.zeros(3)
    handout = _Handout.of(static, pinned=())
    first = _replay(handout, static, 1.0)
    assert first.data_ptr() != static.data_ptr()  # nothing known of the caller yet: a clone
    del first
    second = _replay(handout, static, 2.0)
    assert second.data_ptr() == static.data_ptr() and second is not static
    del second
    assert _replay(handout, static, 3.0).data_ptr() == static.data_ptr()


def test_handout_never_replays_over_a_kept_view_and_then_clones_for_good():
    static = torch.zeros(3)
    handout = _Handout.of(static, pinned=())
    _replay(handout, static, 1.0)  # a clone, dropped at once: static hand-outs from here
    kept = _replay(handout, static, 2.0)[1:]  # a view of the static output, kept
    assert kept.data_ptr() == static.data_ptr() + static.element_size()
    assert _replay(handout, static, 3.0) is None  # would overwrite `kept`: run eagerly instead
    assert _replay(handout, static, 4.0) is None  # still kept
    assert kept.tolist() == [2.0, 2.0]
    del kept
    clones = [_replay(handout, static, value) for value in (5.0, 6.0)]
    assert [c.tolist() for c in clones] == [[5.0] * 3, [6.0] * 3]  # clones: the later replay left the first intact
    del clones
    assert _replay(handout, static, 7.0).data_ptr() != static.data_ptr()  # settled on clones


def test_handout_counts_the_graphs_own_uses_when_it_first_hands_out_not_at_capture():
    """A view alive while the capture ended (and gone since) must not hide a kept alias later."""
    static = torch.zeros(3)
    transient = static[:1]
    handout = _Handout.of(static, pinned=())
    del transient
    _replay(handout, static, 1.0)  # a clone, dropped
    kept = _replay(handout, static, 2.0)[:1]
    assert kept.data_ptr() == static.data_ptr()
    assert _replay(handout, static, 3.0) is None  # held: the replay would overwrite `kept`
    assert kept.tolist() == [2.0]


def test_handout_returns_aliases_of_outputs_that_are_inputs_read_in_place():
    cache, static = torch.zeros(4), torch.zeros(2)
    handout = _Handout.of((cache[:2], static), pinned=(cache,))
    view, out = handout.hand_out((cache[:2], static))
    assert view.data_ptr() == cache.data_ptr()  # the caller's own cache, as an eager call returns it
    assert out.data_ptr() != static.data_ptr()
    kept_cache_view = cache[2:]  # the caller's new views of its cache hold no output of the graph
    assert not handout.held()
