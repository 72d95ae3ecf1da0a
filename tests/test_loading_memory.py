"""Peak host memory of placing a 1 GiB model, half offloaded: never the model plus the arena.

Each measurement runs in a fresh process (tests/memory_probe.py), whose peak
resident memory is compared with what it held right before placing.
"""

from __future__ import annotations

import sys

import pytest
from memory_probe import run_probe

pytest.importorskip("safetensors")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and Linux's ru_maxrss")

SLACK = 16 << 20  # the interpreter's own allocations while placing (page tables, Python objects)
MiB = 1 << 20


def test_loading_a_checkpoint_holds_no_copy_of_the_model(tmp_path):
    run_probe("write", str(tmp_path))
    result = run_probe("load", str(tmp_path), "cpu")
    grown = result["ru_maxrss"] - result["baseline"]
    # On the CPU the "device" is host memory too: kept weights and the slot pool count, the staging is 0.
    placed = result["offloaded_bytes"] + result["kept_device_bytes"] + result["slot_pool_bytes"]
    print(f"peak grew {grown / MiB:.1f} MiB for {placed / MiB:.1f} MiB placed")
    assert result["offloaded_bytes"] == 512 * MiB and result["kept_device_bytes"] == 512 * MiB
    assert grown <= placed + SLACK


def test_offloading_a_host_model_never_holds_model_and_arena():
    result = run_probe("offload", "cpu")
    grown = result["ru_maxrss"] - result["baseline"]
    # The arena fills as the sources are freed: at most one parameter is in both places at once.
    print(f"peak grew {grown / MiB:.1f} MiB over the model on the host")
    assert result["baseline"] >= 1024 * MiB  # the model was really on the host
    assert grown <= result["slot_pool_bytes"] + result["largest_param"] + SLACK
