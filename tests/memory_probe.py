"""Peak host memory of placing a model, measured in a fresh process (run by the memory tests).

    python tests/memory_probe.py write DIR --width W --depth D   # a sharded safetensors checkpoint, a shard at a time
    python tests/memory_probe.py load DIR DEVICE --width W --depth D  # load_checkpoint() it onto a meta model
    python tests/memory_probe.py load DIR DEVICE --host-budget B --forwards N  # ... with a disk tier, then N forwards
    python tests/memory_probe.py offload DEVICE --width W --depth D  # offload() a model built on the host

The default shape is 16 float32 layers of 64 MiB: 1 GiB, of which
``group_size=2`` offloads 512 MiB. ``load`` and ``offload`` print one JSON
line: the resident memory right before placing (``baseline``, taken after
everything else, torch, the CUDA context, the model on the host, is in memory),
the peak resident memory from then on (``peak``: the high-water mark, reset at
the baseline), the resident memory after, split into anonymous and file pages,
and the runtime's byte counts. With ``--forwards`` the blocks run eagerly that
many times after placing (the disk tier reads its layers at every one) and
``peak`` covers them too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import prefetch_compile


REPO = Path(__file__).resolve().parents[1]


def run_probe(*args: str) -> dict:
    """Run this script in a fresh interpreter (the repository importable, installed or not); its JSON line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {}


class Wide(nn.Module):
    """A stack of square bias-free linears: ``depth`` blocks of ``width**2`` parameters."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(depth))


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def resident_split() -> dict[str, int]:
    """Resident bytes by kind (``/proc/self/status``): anonymous memory, and pages of mapped files (libraries)."""
    fields = {"RssAnon:": "anon", "RssFile:": "file", "RssShmem:": "shmem"}
    split = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, *rest = line.split()
            if name in fields:
                split[fields[name]] = int(rest[0]) * 1024  # kB
    return split


def reset_peak() -> None:
    """Start the process's peak resident memory (``VmHWM``) over from its current resident memory.

    ``ru_maxrss`` is not this process's own peak: Linux keeps in it the largest
    resident size of every address space the process had, the parent's copy it ran
    in between fork and exec included. Started from a big process (a pytest worker
    holding models), the probe's growth over its baseline was then the parent's
    size, not the load's (seen on the H200: 930 MiB under pytest, 642 MiB from a
    shell, for the same load). ``VmHWM`` is the current address space's own peak;
    reset here, it starts at the baseline.
    """
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # Linux >= 4.0: reset the high-water mark of the resident set


def peak_resident_bytes() -> int:
    """The most resident memory since :func:`reset_peak` (``VmHWM``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def write(directory: str, width: int, depth: int) -> None:
    """Two layers per shard, so the writer holds one shard, never the model."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for first in range(0, depth, 2):
        shard = f"model-{first // 2:05d}.safetensors"
        tensors = {f"layers.{i}.weight": torch.randn(width, width, generator=generator) for i in range(first, min(first + 2, depth))}
        save_file(tensors, os.path.join(directory, shard))
        weight_map.update(dict.fromkeys(tensors, shard))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as index:
        json.dump({"metadata": {}, "weight_map": weight_map}, index)


def place(
    mode: str, device: str, directory: str | None, width: int, depth: int, host_budget: int | None = None, forwards: int = 0
) -> dict:
    if device == "cuda":
        torch.zeros(1, device=device)  # the CUDA context belongs to the baseline
    if mode == "load":
        with torch.device("meta"):
            model = Wide(width, depth)
    else:
        model = Wide(width, depth).requires_grad_(False)  # real weights on the host: the source
    largest = max(param.numel() * param.element_size() for param in model.parameters())
    baseline = resident_bytes()
    baseline_split = resident_split()
    reset_peak()
    if mode == "load":
        runtime = prefetch_compile.load_checkpoint(model, directory, device, group_size=2, host_budget=host_budget)
    else:
        runtime = prefetch_compile.offload(model, device, group_size=2)
    hidden = torch.ones(1, width, device=device)
    with torch.no_grad():
        for _ in range(forwards):
            for block in model.layers:  # eagerly: the block hooks wait for each offloaded layer and start the next
                hidden = block(hidden) / width
    if device == "cuda":
        torch.cuda.synchronize()
    stats = runtime.stats()
    return {
        "baseline": baseline,
        "peak": peak_resident_bytes(),
        "after": resident_bytes(),
        "baseline_split": baseline_split,
        "after_split": resident_split(),
        "largest_param": largest,
        "offloaded_bytes": stats.offloaded_bytes,
        "host_bytes": runtime.host.nbytes,
        "pinned": runtime.host.pinned,
        "kept_device_bytes": stats.kept_device_bytes,
        "slot_pool_bytes": stats.slot_pool_bytes,
        "disk_layers": stats.disk_layers,
        "disk_bytes": stats.disk_bytes,
        "staging_bytes": stats.staging_bytes,
        "disk_reads": sum(runtime.disk.reads.values()) if runtime.disk is not None else 0,
        "finite": bool(hidden.isfinite().all()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["write", "load", "offload"])
    parser.add_argument("args", nargs="+", help="write: DIR; load: DIR DEVICE; offload: DEVICE")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--host-budget", type=int, default=None, help="load: bytes of host memory for the offloaded layers")
    parser.add_argument("--forwards", type=int, default=0, help="eager forwards after placing")
    options = parser.parse_args()
    if options.mode == "write":
        write(options.args[0], options.width, options.depth)
    elif options.mode == "load":
        print(json.dumps(place(
            "load", options.args[1], options.args[0], options.width, options.depth, options.host_budget, options.forwards
        )))
    else:
        print(json.dumps(place("offload", options.args[0], None, options.width, options.depth)))


if __name__ == "__main__":
    main()
