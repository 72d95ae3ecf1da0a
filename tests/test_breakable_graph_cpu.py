"""Breakable CUDA graphs without CUDA: the decorator and the wrapper fall back to plain eager calls."""

import pytest
import torch

from prefetch_compile.breakable_graph import BreakableCUDAGraph, BreakableGraphed, current_capture, eager_break
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
