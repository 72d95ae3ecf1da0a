"""Everything under tests/gpu needs a CUDA device: marked ``cuda``, skipped cleanly without one.

Also makes ``examples/`` importable (the Llama-like model) and gives every test a
fresh Dynamo and an empty CUDA cache, so one test's graphs and pools never feed
another's memory numbers.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.cuda)
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _clean_cuda():
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    yield
    torch._dynamo.reset()
