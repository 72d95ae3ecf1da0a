"""Peak host memory of placing a 1 GiB model, half offloaded: never the model plus the arena.

Each measurement runs in a fresh process (tests/memory_probe.py), whose peak
resident memory is compared with what it held right before placing.
"""

from __future__ import annotations

import sys

import pytest
from memory_probe import run_probe

pytest.importorskip("safetensors")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc/self/status and clear_refs")

SLACK = 16 << 20  # the interpreter's own allocations while placing (page tables, Python objects)
MiB = 1 << 20


def test_loading_a_checkpoint_holds_no_copy_of_the_model(tmp_path):
    run_probe("write", str(tmp_path))
    result = run_probe("load", str(tmp_path), "cpu")
    grown = result["peak"] - result["baseline"]
    # On the CPU the "device" is host memory too: kept weights and the slot pool count, the staging is 0.
    placed = result["offloaded_bytes"] + result["kept_device_bytes"] + result["slot_pool_bytes"]
    print(f"peak grew {grown / MiB:.1f} MiB for {placed / MiB:.1f} MiB placed")
    assert result["offloaded_bytes"] == 512 * MiB and result["kept_device_bytes"] == 512 * MiB
    assert grown <= placed + SLACK


def test_a_host_budget_bounds_the_host_memory_of_loading_and_running(tmp_path):
    """The disk tier: 7 of the 8 offloaded 64 MiB layers stay on disk, and the forwards read them from there."""
    run_probe("write", str(tmp_path))
    budget = 256 * MiB
    result = run_probe("load", str(tmp_path), "cpu", "--host-budget", str(budget), "--forwards", "2")
    grown = result["peak"] - result["baseline"]
    on_cpu_device = result["kept_device_bytes"] + result["slot_pool_bytes"]  # the "device" is host memory here
    print(f"peak grew {grown / MiB:.1f} MiB: budget {budget / MiB:.0f} MiB (arena {result['host_bytes'] / MiB:.0f}, "
          f"staging {result['staging_bytes'] / MiB:.1f}) + {on_cpu_device / MiB:.0f} MiB kept and slots")
    assert (result["disk_layers"], result["host_bytes"]) == (7, 64 * MiB)
    assert result["host_bytes"] + result["staging_bytes"] <= budget
    assert result["disk_reads"] >= 2 * 7 and result["finite"]  # every disk-resident layer read at each forward
    assert grown <= budget + on_cpu_device + SLACK
    assert grown <= result["offloaded_bytes"] + on_cpu_device - 200 * MiB  # well below holding every offloaded layer


def test_offloading_a_host_model_never_holds_model_and_arena():
    result = run_probe("offload", "cpu")
    grown = result["peak"] - result["baseline"]
    # The arena fills as the sources are freed: at most one parameter is in both places at once.
    print(f"peak grew {grown / MiB:.1f} MiB over the model on the host")
    assert result["baseline"] >= 1024 * MiB  # the model was really on the host
    assert grown <= result["slot_pool_bytes"] + result["largest_param"] + SLACK
