"""Timing, bandwidth, memory and environment helpers shared by the benchmarks.

Everything here works on CPU too (wall-clock timers instead of CUDA events),
so the harness can be smoke-tested on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]


def add_repo_to_path() -> None:
    """Make ``prefetch_compile`` (when not installed) and ``examples/llama_like.py`` importable."""
    for path in (REPO, REPO / "examples"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


add_repo_to_path()
from prefetch_compile.calibration import time_calls  # noqa: E402, F401  (re-exported: the one timer)


def bench_device(name: str) -> torch.device:
    """The device a benchmark runs on, with a CUDA index made explicit (the runtime keys streams by it)."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def add_shape_arguments(parser: argparse.ArgumentParser, layers_help: str) -> None:
    """--device, --layers, --tiny and --dtype: the Llama-shaped model a single-device benchmark runs (see bench_shape)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=32, help=layers_help)
    parser.add_argument("--tiny", action="store_true", help="llama_like.tiny_shape() (CPU smoke tests)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])


def bench_shape(layers: int, tiny: bool):
    """The Llama-8B layer shape with ``layers`` layers, or ``llama_like.tiny_shape`` for CPU smoke tests."""
    import llama_like  # examples/, on the path after add_repo_to_path()

    return llama_like.tiny_shape(layers) if tiny else llama_like.llama8b_shape(layers)


def log(message: str, started: float | None = None) -> None:
    stamp = f"[{time.perf_counter() - started:7.1f}s] " if started is not None else ""
    print(f"{stamp}{message}", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_time(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call takes, host and device both done."""
    synchronize(device)
    began = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - began


def measure_h2d_bandwidth(device: torch.device, nbytes: int, reps: int = 5) -> dict:
    """Host-to-device bandwidth of one large copy from pinned memory (bytes/s), median of ``reps``.

    On CPU this measures a plain memory copy instead, so that the harness runs end to end.
    """
    pinned = device.type == "cuda"
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    host.fill_(1)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for _ in range(2):
        target.copy_(host, non_blocking=pinned)
    times = time_calls(lambda: target.copy_(host, non_blocking=pinned), reps, device)
    median = statistics.median(times)
    del host, target
    release_memory(device)
    return {
        "bytes_per_s": nbytes / median,
        "copy_bytes": nbytes,
        "reps": reps,
        "seconds": times,
        "what": "pinned host -> device, one copy_, CUDA events" if pinned else "CPU memory copy (no GPU)",
    }


def release_memory(device: torch.device) -> None:
    """Free what the last system left behind: compiled graphs, CUDA graph pools, cached blocks."""
    try:
        torch._dynamo.reset()
    except Exception:  # pragma: no cover - best effort
        pass
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        host_empty = getattr(torch._C, "_host_emptyCache", None)
        if host_empty is not None:
            host_empty()  # return cached pinned host blocks as well


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def allocated_bytes(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def git_commit(explicit: str | None) -> str:
    if explicit:
        return explicit
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def gib(nbytes: int | float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**30:.2f}"
