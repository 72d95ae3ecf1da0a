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
from typing import Callable, TypeVar

import torch

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


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


def timed_call(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """Seconds one call takes, host and device both done, and what it returned."""
    synchronize(device)
    began = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - began, result


def wall_time(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call takes, host and device both done."""
    return timed_call(fn, device)[0]


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
    # One pass is not always enough: what it frees can release the last references to other cycles
    # (seen after quantized models: an offloaded model's runtime, with its pinned arena, lived on).
    for _ in range(4):
        if not gc.collect():
            break
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


def run_meta(device: torch.device, args, **extra: object) -> dict:
    """What a benchmark's JSON records about its run: the device, the versions, the commit, the arguments."""
    import platform

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": git_commit(args.commit),
        "args": vars(args),
        **extra,
    }


def git_commit(explicit: str | None) -> str:
    """The commit measured: ``explicit``, else ``$BENCH_COMMIT``, else ``git rev-parse``.

    The GPU machine gets a copy of the working tree whose ``.git`` may not match it;
    the command that runs a benchmark there names the commit in ``BENCH_COMMIT``.
    """
    if explicit or os.environ.get("BENCH_COMMIT"):
        return explicit or os.environ["BENCH_COMMIT"]
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


def status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: ``5`` to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5\n")
        return True
    except OSError:
        return False
