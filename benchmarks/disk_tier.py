"""The disk tier against its limit: decode b1 with offloaded layers streamed from disk, vs min(disk, H2D) bandwidth.

1. The checkpoint: a Llama-shaped decoder (the 8B layer shape by default, with a
   32000-token vocabulary), one safetensors shard per decoder layer, written by
   ``benchmarks/large_model.py``'s writer (one tensor in host memory at a time)
   and reused when the directory already holds it. Then every shard is
   fsynced and dropped from the page cache with ``posix_fadvise(DONTNEED)``,
   and ``/proc/sys/vm/drop_caches`` is written where the process may; the
   JSON says what worked and how much of the checkpoint the page cache still
   held afterwards (``mincore``).
2. The disk's read bandwidth, measured the way the tier reads: its
   ``DirectReader`` (``O_DIRECT`` where the filesystem allows it), one layer's
   extents at a time into one page-aligned staging buffer (page-locked on a
   GPU), one thread, the layers back to back.
3. The host-to-device bandwidth of one large pinned copy (``bench_util``).
4. Per host budget: ``half`` (the staging ring plus half the offloaded
   layers: the others on disk) and ``disk`` (the ring alone: every offloaded
   layer on disk). A fresh meta model, ``load_checkpoint(host_budget=...)``
   with every layer offloaded, ``torch.compile(backend="prefetch_offload")``,
   decode ``[1, 1]`` tokens: warm-up, then back-to-back timed forwards (CUDA
   events), median ms/forward, against the limit
   ``max(disk bytes / disk bandwidth, offloaded bytes / H2D bandwidth)``; the
   disk stream's rate against ``min(disk, H2D)`` bandwidth; layers read from
   disk per forward; peak host RSS (``VmHWM``, reset before the case) and
   device memory. The outputs of all cases must be equal (same weights, same
   graphs), or the run fails.

Writes ``disk_tier.json`` in ``--out`` and prints every number.

GPU (about 2-3 minutes with a 0.5-2 GB/s disk: 5.8 GB written, at most ~60 GB read per case; the
checkpoint goes under the working directory, on the machine's disk: the JSON names its filesystem)::

    python benchmarks/disk_tier.py --out $OUT/disk_tier

CPU smoke test::

    python benchmarks/disk_tier.py --device cpu --layers 8 --hidden 64 --intermediate 128 --heads 4 --kv-heads 2 \\
        --vocab 256 --compiler aot_eager --iters 3 --ckpt-dir /tmp/disk_tier_ckpt --out /tmp/disk_tier_out
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import add_repo_to_path, bench_device, gib, log, measure_h2d_bandwidth, release_memory, run_meta, time_calls, wall_time  # noqa: E402

add_repo_to_path()
import llama_like  # noqa: E402  (examples/llama_like.py)
from large_model import (  # noqa: E402  (benchmarks/large_model.py: its checkpoint writer)
    add_shape_arguments,
    checkpoint_metadata,
    existing_checkpoint_matches,
    make_tensor,
    shape_of,
    tensor_specs,
    write_checkpoint,
)

import prefetch_compile  # noqa: E402
from prefetch_compile.checkpoint import INDEX_NAME, read_checkpoint_headers  # noqa: E402
from prefetch_compile.config import PlanOptions  # noqa: E402
from prefetch_compile.direct_io import DirectReader  # noqa: E402
from prefetch_compile.disk_layout import RING_BUFFERS, read_layout  # noqa: E402
from prefetch_compile.memory import lazy_host_buffer, register_pinned, unregister_pinned  # noqa: E402
from prefetch_compile.plan import build_plan  # noqa: E402

PLAN = {"group_size": 1, "num_in_group": 1}  # every decoder layer offloaded: copies dominate decode


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_shape_arguments(p, llama_like.LlamaShape(vocab=32000, hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=12))
    p.add_argument("--prefetch-step", type=int, default=2)
    p.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager"])
    p.add_argument("--cases", default="half,disk", help="comma-separated: half (half the offloaded layers on disk), disk (all)")
    p.add_argument("--ckpt-dir", default="disk_tier_ckpt")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep shards this run wrote (default: delete at the end)")
    p.add_argument("--disk-probe-bytes", type=int, default=3 << 30, help="bytes read to measure the disk (at most the offloaded bytes)")
    p.add_argument("--seconds-per-case", type=float, default=20.0, help="timed forwards per case: about this long")
    p.add_argument("--iters", type=int, default=10, help="at most this many timed forwards per case (at least 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards per case (the first compiles)")
    p.add_argument("--bw-bytes", type=int, default=1 << 30, help="bytes of the host-to-device bandwidth copy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default="disk_tier_out")
    return p.parse_args(argv)


# ---------------------------------------------------------------- the page cache
def drop_page_cache(paths: list[Path]) -> dict:
    """fsync and ``posix_fadvise(DONTNEED)`` every file; ``drop_caches`` if writable. What worked, and what stayed cached."""
    advised = True
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            advised = False
        finally:
            os.close(fd)
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        dropped = True
    except OSError:
        dropped = False
    return {"fadvise_dontneed": advised, "drop_caches": dropped, "cached_fraction_after": cached_fraction(paths)}


def filesystem_of(path: Path) -> dict:
    """The mount holding ``path`` (from /proc/mounts): a tmpfs "disk" would be host memory."""
    real = os.path.realpath(path)
    best = {"mountpoint": "/", "fstype": None, "source": None}
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            source, mountpoint, fstype = line.split()[:3]
            if (real == mountpoint or real.startswith(mountpoint.rstrip("/") + "/")) and len(mountpoint) >= len(best["mountpoint"]):
                best = {"mountpoint": mountpoint, "fstype": fstype, "source": source}
    except OSError:
        pass
    return best


def cached_fraction(paths: list[Path]) -> float | None:
    """The fraction of the files' pages in the page cache (``mincore`` over a mapping that touches none)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        page = os.sysconf("SC_PAGE_SIZE")
        cached = total = 0
        for path in paths:
            size = path.stat().st_size
            if not size:
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                address = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
                if address in (None, ctypes.c_void_p(-1).value):
                    return None
                pages = -(-size // page)
                vector = (ctypes.c_ubyte * pages)()
                status = libc.mincore(address, size, vector)
                libc.munmap(address, size)
                if status:
                    return None
            finally:
                os.close(fd)
            cached += sum(byte & 1 for byte in vector)
            total += pages
        return cached / max(total, 1)
    except (OSError, AttributeError):
        return None


# ---------------------------------------------------------------- measuring
def measure_disk_bandwidth(directory: Path, shape, dtype: torch.dtype, device: torch.device, max_bytes: int) -> dict:
    """The tier's reads (its reader, its extents, one staging buffer, one thread), layer after layer, timed."""
    with torch.device("meta"):
        model = llama_like.LlamaLikeDecoder(shape).to(dtype)
    plan = build_plan(model, PlanOptions(**PLAN))
    stored = read_checkpoint_headers(directory)
    layers = [read_layout(layer, stored) for layer in plan.offloaded]
    reader = DirectReader([extent.path for layer in layers for extent in layer.extents])
    buffer = lazy_host_buffer(max(layer.staging_bytes for layer in layers))
    if device.type == "cuda":
        register_pinned(buffer)
    read = 0
    began = time.perf_counter()
    try:
        for layer in layers:
            for extent in layer.extents:
                read += reader.read(extent.path, extent.file_offset, extent.nbytes, buffer.data_ptr() + extent.staging_offset)
            if read >= max_bytes:
                break
        seconds = time.perf_counter() - began
    finally:
        if device.type == "cuda":
            unregister_pinned(buffer)
        reader.close()
    return {
        "bytes_per_s": read / seconds,
        "bytes": read,
        "seconds": seconds,
        "read_size": max(layer.staging_bytes for layer in layers),
        "o_direct": reader.direct,
        "what": "DirectReader.read of each layer's extents into one page-aligned buffer, one thread, back to back",
    }


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


def host_budget(case: str, stats_source: dict) -> int:
    """``half``: the ring plus half the offloaded layers' blocks; ``disk``: the ring alone."""
    ring = RING_BUFFERS * stats_source["staging_bytes"]
    if case == "disk":
        return ring + 4096
    if case == "half":
        blocks = stats_source["block_bytes"]
        return ring + sum(sorted(blocks)[: len(blocks) // 2]) + 4096
    raise SystemExit(f"unknown case {case!r}: use half or disk")


def run_case(case: str, budget: int, args, shape, dtype, directory: Path, device: torch.device, bandwidths: dict, started: float) -> tuple[dict, torch.Tensor]:
    release_memory(device)
    drop_page_cache(sorted(directory.glob("*.safetensors")))
    peak_reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = status_bytes("VmRSS")
    with torch.device("meta"):
        model = llama_like.LlamaLikeDecoder(shape).to(dtype)
    model.inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, shape.head_dim, 2, dtype=torch.float32) / shape.head_dim))
    began = time.perf_counter()
    runtime = prefetch_compile.load_checkpoint(
        model, directory, device, **PLAN, prefetch_step=args.prefetch_step, host_budget=budget
    )
    load_s = time.perf_counter() - began
    stats = runtime.stats()
    limit_s = max(stats.disk_bytes / bandwidths["disk"], stats.offloaded_bytes / bandwidths["h2d"])
    log(f"{case}: host_budget {gib(budget)} GiB: {stats.disk_layers}/{stats.offloaded_layers} offloaded layers on disk "
        f"({gib(stats.disk_bytes)} GiB a forward), arena {gib(runtime.host.nbytes)} GiB, ring {gib(stats.staging_bytes)} GiB; "
        f"loaded in {load_s:.1f} s; limit {limit_s * 1e3:.1f} ms/forward", started)
    compiled = torch.compile(model, backend="prefetch_offload", options={"compiler": args.compiler}, dynamic=False)
    tokens = llama_like.sample_tokens(shape, 1, 1, device=device, seed=args.seed)
    with torch.inference_mode():
        warmup_s = wall_time(lambda: [compiled(tokens) for _ in range(args.warmup)], device)
        iters = max(3, min(args.iters, int(args.seconds_per_case / max(limit_s, 1e-6))))
        reads_before, misses_before = disk_reads(runtime), runtime.counters.ensure_misses
        seconds = time_calls(lambda: compiled(tokens), iters, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        reads = disk_reads(runtime) - reads_before
        output = compiled(tokens).float().cpu()
    measured_s = statistics.median(seconds)
    result = {
        "host_budget": budget,
        "stats": {**stats.__dict__, "device_bytes_saved": stats.device_bytes_saved},
        "host_arena_bytes": runtime.host.nbytes,
        "o_direct": runtime.disk.direct if runtime.disk else None,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "iters": iters,
        "seconds": seconds,
        "ms_per_forward": measured_s * 1e3,
        "limit_ms": limit_s * 1e3,
        "fraction_of_limit": limit_s / measured_s,
        "disk_rate_bytes_per_s": stats.disk_bytes / measured_s,
        "disk_rate_vs_min_bandwidth": stats.disk_bytes / measured_s / min(bandwidths["disk"], bandwidths["h2d"]),
        # Read ahead shifts reads across a forward's boundary by at most the ring; over many forwards it averages out.
        "disk_reads_per_forward": reads / iters,
        "ensure_misses": runtime.counters.ensure_misses - misses_before,
        "host_rss_before": rss_before,
        "host_peak_rss": status_bytes("VmHWM") if peak_reset else None,
        "device_peak": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }
    if result["host_peak_rss"] is not None:
        result["host_peak_growth"] = result["host_peak_rss"] - rss_before
    log(f"{case}: {result['ms_per_forward']:.1f} ms/forward ({iters} timed), {result['fraction_of_limit']:.3f} of the limit; "
        f"disk stream {result['disk_rate_bytes_per_s'] / 1e9:.2f} GB/s = {result['disk_rate_vs_min_bandwidth']:.3f} of "
        f"min(disk, H2D); {result['disk_reads_per_forward']:.2f} layer reads/forward; host peak grew "
        f"{gib(result.get('host_peak_growth'))} GiB; device peak {gib(result['device_peak'])} GiB", started)
    if runtime.disk is not None:
        runtime.disk.close()  # its pinned ring now, not at some later collection
    del compiled, model, runtime
    return result, output


def disk_reads(runtime) -> int:
    return sum(runtime.disk.reads.values()) if runtime.disk is not None else 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = bench_device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = shape_of(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if device.type == "cuda":
        torch.zeros(1, device=device)
    specs = tensor_specs(shape, dtype)
    result: dict = {"meta": run_meta(device, args, shape={**shape.__dict__, "params": shape.num_params()})}

    # 1. The checkpoint, out of the page cache.
    directory = Path(args.ckpt_dir)
    metadata = checkpoint_metadata(args)
    wrote = not existing_checkpoint_matches(directory, metadata)
    if wrote:
        model_bytes = shape.num_params() * dtype.itemsize
        log(f"writing {gib(model_bytes)} GiB of shards to {directory}", started)
        began = time.perf_counter()
        write_checkpoint(directory, specs, dtype, args.seed, device, metadata)
        result["write_s"] = time.perf_counter() - began
    shards = sorted(directory.glob("*.safetensors"))
    result["filesystem"] = filesystem_of(directory)
    result["page_cache"] = {"cached_fraction_before": cached_fraction(shards), **drop_page_cache(shards)}
    log(f"checkpoint on {result['filesystem']}; page cache: {result['page_cache']}", started)

    # 2, 3. The bandwidths.
    disk = measure_disk_bandwidth(directory, shape, dtype, device, args.disk_probe_bytes)
    h2d = measure_h2d_bandwidth(device, args.bw_bytes)
    result["disk_bandwidth"], result["h2d_bandwidth"] = disk, h2d
    bandwidths = {"disk": disk["bytes_per_s"], "h2d": h2d["bytes_per_s"]}
    log(f"disk {disk['bytes_per_s'] / 1e9:.2f} GB/s ({gib(disk['bytes'])} GiB in {disk['read_size'] / 2**20:.0f} MiB reads, "
        f"O_DIRECT {disk['o_direct']}); H2D {h2d['bytes_per_s'] / 1e9:.1f} GB/s", started)

    # 4. The cases.
    with torch.device("meta"):
        plan = build_plan(llama_like.LlamaLikeDecoder(shape).to(dtype), PlanOptions(**PLAN))
    stored = read_checkpoint_headers(directory)
    sizes = {
        "staging_bytes": max(read_layout(layer, stored).staging_bytes for layer in plan.offloaded),
        "block_bytes": [layer.nbytes for layer in plan.offloaded],
    }
    result["cases"] = {}
    outputs = {}
    for case in args.cases.split(","):
        result["cases"][case], outputs[case] = run_case(
            case, host_budget(case, sizes), args, shape, dtype, directory, device, bandwidths, started
        )
    first = next(iter(outputs.values()))
    result["outputs_equal_across_cases"] = all(torch.equal(first, output) for output in outputs.values())
    check_disk_values(directory, specs, shape, dtype, args.seed, device, result)
    (out / "disk_tier.json").write_text(json.dumps(result, indent=1))
    print_summary(result)
    if wrote and not args.keep_checkpoint:
        for shard in shards:
            shard.unlink()
        (directory / INDEX_NAME).unlink()
        log(f"deleted the shards written to {directory} (--keep-checkpoint keeps them)", started)
    log(f"wrote {out / 'disk_tier.json'}", started)
    if not result["outputs_equal_across_cases"] or not result["disk_values_match"]:
        raise SystemExit("the disk tier gave different numbers for the same checkpoint: see disk_tier.json")


def check_disk_values(directory: Path, specs, shape, dtype: torch.dtype, seed: int, device: torch.device, result: dict) -> None:
    """The smallest weight matrix of the last layer, as the disk tier reads it back, holds the written values."""
    sizes = dict(specs)
    index = {name: position for position, (name, _) in enumerate(specs)}
    name = min((n for n, size in specs if n.startswith(f"layers.{shape.layers - 1}.") and len(size) == 2), key=lambda n: sizes[n][0] * sizes[n][1])
    entry = read_checkpoint_headers(directory)[name]
    reader = DirectReader([entry.path])
    try:
        got = reader.read_range(entry.path, entry.offset, entry.nbytes).view(dtype).reshape(entry.shape)
    finally:
        reader.close()
    result["disk_values_match"] = bool(torch.equal(got, make_tensor(index[name], name, sizes[name], dtype, seed, device)))


def print_summary(result: dict) -> None:
    print()
    print(f"device                 {result['meta']['device']}")
    print(f"disk read bandwidth    {result['disk_bandwidth']['bytes_per_s'] / 1e9:.2f} GB/s (O_DIRECT {result['disk_bandwidth']['o_direct']})")
    print(f"H2D bandwidth          {result['h2d_bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s")
    print(f"checkpoint filesystem  {result['filesystem']}")
    print(f"page cache             {result['page_cache']}")
    for name, case in result["cases"].items():
        stats = case["stats"]
        print(f"{name:<6} {stats['disk_layers']}/{stats['offloaded_layers']} layers on disk, budget {gib(case['host_budget'])} GiB: "
              f"{case['ms_per_forward']:.1f} ms/forward vs limit {case['limit_ms']:.1f} ({case['fraction_of_limit']:.3f}); "
              f"disk stream {case['disk_rate_vs_min_bandwidth']:.3f} of min(disk, H2D); host peak grew "
              f"{gib(case.get('host_peak_growth'))} GiB; device peak {gib(case['device_peak'])} GiB")
    print(f"outputs equal across cases: {result['outputs_equal_across_cases']}; disk values match: {result['disk_values_match']}")


if __name__ == "__main__":
    main()
