"""The machine facts the benchmarks' limits rest on, measured in one short run.

* pinned host-to-device bandwidth at a Llama-8B layer's size (436 MB) and at 1 MiB,
  issued eagerly (``cudaMemcpyAsync``) and as the memcpy nodes of a replayed CUDA
  graph: if graph-captured copies were slower, CUDA graphs could never be as fast
  as eager calls at copy-bound decode, whatever the runtime does;
* the same copy from a page-locked anonymous mapping (``cudaHostRegister``, what the
  host arena is) as from PyTorch's pinned allocator;
* disk read bandwidth of a freshly written file with ``O_DIRECT`` (page cache
  bypassed) and with buffered reads after ``posix_fadvise(DONTNEED)``, the two
  ways a disk tier can read;
* host memory and disk space.

    python benchmarks/device_probe.py --out out/probe         # GPU machine
    python benchmarks/device_probe.py --no-cuda --disk-gib 0.25   # disk part only, anywhere
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import device_name, git_commit  # noqa: E402

LAYER_BYTES = 436_207_616  # one Llama-8B decoder layer in bf16


def copy_bandwidth(source: torch.Tensor, destination: torch.Tensor, reps: int, graphed: bool) -> float:
    """Bytes per second of ``reps`` back-to-back copies, eagerly or as one replayed CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        destination.copy_(source, non_blocking=True)  # warm-up
        if graphed:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(reps):
                    destination.copy_(source, non_blocking=True)
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = 0.0
        for _ in range(3):
            begin.record(stream)
            if graphed:
                graph.replay()
            else:
                for _ in range(reps):
                    destination.copy_(source, non_blocking=True)
            end.record(stream)
            end.synchronize()
            best = max(best, source.nbytes * reps / (begin.elapsed_time(end) / 1e3))
    return best


def registered_host_tensor(nbytes: int) -> tuple[torch.Tensor, mmap.mmap]:
    """A tensor over an anonymous mapping page-locked with cudaHostRegister (how the host arena is made)."""
    mapping = mmap.mmap(-1, nbytes)
    tensor = torch.frombuffer(mapping, dtype=torch.uint8)
    tensor.fill_(1)
    status = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), nbytes, 0)
    if int(status) != 0:
        raise RuntimeError(f"cudaHostRegister failed: {status}")
    return tensor, mapping


def probe_copies(reps: int) -> dict:
    device = torch.device("cuda")
    results = {}
    for label, nbytes in (("layer_436MB", LAYER_BYTES), ("1MiB", 1 << 20)):
        count = reps if nbytes > 1 << 24 else 200
        pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
        registered, mapping = registered_host_tensor(nbytes)
        destination = torch.empty(nbytes, dtype=torch.uint8, device=device)
        results[label] = {
            "pinned_eager_GBps": copy_bandwidth(pinned, destination, count, graphed=False) / 1e9,
            "pinned_graph_GBps": copy_bandwidth(pinned, destination, count, graphed=True) / 1e9,
            "registered_eager_GBps": copy_bandwidth(registered, destination, count, graphed=False) / 1e9,
            "registered_graph_GBps": copy_bandwidth(registered, destination, count, graphed=True) / 1e9,
        }
        torch.cuda.cudart().cudaHostUnregister(registered.data_ptr())
        del registered, pinned, destination
        mapping.close()
    return results


def probe_disk(directory: Path, nbytes: int, block: int) -> dict:
    """Write ``nbytes`` once, then read them back with O_DIRECT and buffered (after DONTNEED)."""
    path = directory / "probe.bin"
    chunk = os.urandom(block)
    began = time.perf_counter()
    with open(path, "wb") as file:
        for _ in range(nbytes // block):
            file.write(chunk)
        file.flush()
        os.fsync(file.fileno())
    result = {"bytes": nbytes, "read_size": block, "write_GBps": nbytes / (time.perf_counter() - began) / 1e9}
    buffer = mmap.mmap(-1, block)  # page aligned, as O_DIRECT requires
    for mode in ("o_direct", "buffered_after_dontneed"):
        flags = os.O_RDONLY | (os.O_DIRECT if mode == "o_direct" and hasattr(os, "O_DIRECT") else 0)
        try:
            descriptor = os.open(path, flags)
        except OSError as error:
            result[mode] = f"open failed: {error}"
            continue
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            began = time.perf_counter()
            offset = 0
            while offset < nbytes:
                offset += os.preadv(descriptor, [buffer], offset)
            result[f"{mode}_GBps"] = nbytes / (time.perf_counter() - began) / 1e9
        except OSError as error:
            result[mode] = f"read failed: {error}"
        finally:
            os.close(descriptor)
    path.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="probe_out")
    parser.add_argument("--no-cuda", action="store_true")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--disk-dir", default=None, help="where to write the disk probe's file (default: a temp dir)")
    parser.add_argument("--disk-gib", type=float, default=4.0)
    parser.add_argument("--read-mib", type=int, default=16, help="bytes per read call")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"torch": torch.__version__, "commit": git_commit(None)}
    with open("/proc/meminfo") as meminfo:
        result["meminfo"] = {line.split(":")[0]: line.split(":")[1].strip() for line in meminfo if line.startswith(("MemTotal", "MemAvailable"))}
    if not args.no_cuda and torch.cuda.is_available():
        result["device"] = device_name(torch.device("cuda"))
        result["copies"] = probe_copies(args.reps)
    directory = Path(args.disk_dir) if args.disk_dir else Path(tempfile.mkdtemp(prefix="disk_probe_"))
    directory.mkdir(parents=True, exist_ok=True)
    result["disk_free_bytes"] = shutil.disk_usage(directory).free
    result["disk"] = probe_disk(directory, int(args.disk_gib * 2**30) // (args.read_mib << 20) * (args.read_mib << 20), args.read_mib << 20)
    (out / "device_probe.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
