"""The disk tier against its limit: decode b1 with offloaded layers streamed from disk, and where the time goes.

1. The checkpoint: a Llama-shaped decoder (the 8B layer shape by default, with a
   32000-token vocabulary), one safetensors shard per decoder layer, written by
   ``benchmarks/large_model.py``'s writer (one tensor in host memory at a time)
   and reused when the directory already holds it.
2. The host-to-device bandwidth of one large pinned copy (``bench_util``).
3. The cases, in the order given (``--cases``; a case may repeat, to see the
   disk drift): ``half`` (a host budget of the staging ring plus half the
   offloaded layers: the others on disk) and ``disk`` (the ring alone: every
   offloaded layer on disk), each with an optional ring depth: ``half3`` is
   ``half`` with ``staging_buffers=3`` (the budget grows by the extra buffer, so
   the same layers are on disk). Per case:

   a. Every shard is fsynced and dropped from the page cache
      (``posix_fadvise(DONTNEED)``, and ``/proc/sys/vm/drop_caches`` where the
      process may); the JSON says what worked and what stayed cached (``mincore``).
   b. The disk, right before the case, the way the tier reads: its
      ``DirectReader`` (``O_DIRECT`` where the filesystem allows it), one
      layer's extents at a time into one page-aligned buffer (page-locked on a
      GPU), one thread, back to back, ``--disk-probe-bytes``: once over the
      offloaded layers in file order (``sequential``), and once over the case's
      disk-resident layers in the order the tier reads them (``case order``,
      which skips the host-resident layers' files; skipped when the same).
   c. A fresh meta model, ``load_checkpoint(host_budget=..., staging_buffers=...)``
      with every layer offloaded, ``torch.compile(backend="prefetch_offload")``,
      decode ``[1, 1]`` tokens: warm-up, then back-to-back timed forwards (CUDA
      events), median ms/forward, against the limit ``max(disk bytes / disk
      bandwidth, copied bytes / H2D bandwidth)`` with the disk bandwidth
      from the case-order probe just before, from the sequential one, and from
      the reader thread's own rate inside its reads during the timed forwards.
   d. Where the stream's time went over the timed forwards
      (``runtime.disk.stream_stats()``, a snapshot before and after, and one
      after each forward): the reader's busy fraction (seconds inside reads
      over wall seconds), its seconds waiting for a buffer's copy to finish
      and idle with nothing queued, the host's seconds blocked in ``take``,
      discarded read-ahead, layers read per forward (by the reader and taken
      for a copy); per forward, the same as a list. Peak host RSS (``VmHWM``,
      reset before the case) and device memory.

   The outputs of all cases must be equal (same weights, same graphs), or the run fails.

How to read it: a busy fraction near 1 with a reader rate below the probe's means
the disk itself was slower during the case (or under this access pattern, if
the case-order probe is slow too); a busy fraction well below 1 means the reader
waited: ``idle_s`` (every buffer filled or held: the host took too late) or
``copy_wait_s`` (a buffer's copy had not finished), and a deeper ring
(``half3``) should then close the gap.

Writes ``disk_tier.json`` in ``--out`` and prints every number.

GPU (about 2.5 minutes for the five cases below with a 1.7-2 GB/s disk and the default 6 timed
forwards per case; the checkpoint goes on the machine's disk: the JSON names its filesystem)::

    python benchmarks/disk_tier.py --ckpt-dir /root/dt_ckpt --cases half,half3,half4,disk,half --out $OUT/disk_tier

CPU smoke test::

    python benchmarks/disk_tier.py --device cpu --layers 8 --hidden 64 --intermediate 128 --heads 4 --kv-heads 2 \\
        --vocab 256 --compiler aot_eager --iters 3 --cases half,half3,disk --disk-probe-bytes 16777216 \\
        --ckpt-dir /tmp/disk_tier_ckpt --out /tmp/disk_tier_out
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import (  # noqa: E402
    add_repo_to_path, bench_device, gib, log, measure_h2d_bandwidth, release_memory, reset_peak_rss, run_meta, status_bytes,
    time_calls, wall_time,
)

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
from prefetch_compile.disk_layout import STAGING_BUFFERS, DiskLayer, plan_disk_tier, read_layout  # noqa: E402
from prefetch_compile.disk_tier import StreamStats  # noqa: E402
from prefetch_compile.memory import lazy_host_buffer, register_pinned, unregister_pinned  # noqa: E402
from prefetch_compile.plan import build_plan  # noqa: E402

PLAN = {"group_size": 1, "num_in_group": 1}  # every decoder layer offloaded: copies dominate decode


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_shape_arguments(p, llama_like.LlamaShape(vocab=32000, hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=12))
    p.add_argument("--prefetch-step", type=int, default=2)
    p.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager"])
    p.add_argument(
        "--cases",
        default="half,half3,disk",
        help="comma-separated, in order, repeats allowed: half (half the offloaded layers on disk), disk (all), "
        "each optionally followed by its ring depth (half3: staging_buffers=3; default 2)",
    )
    p.add_argument("--ckpt-dir", default="disk_tier_ckpt")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep shards this run wrote (default: delete at the end)")
    p.add_argument("--disk-probe-bytes", type=int, default=2 << 30, help="bytes each probe reads before a case (cycling over its layers)")
    p.add_argument("--seconds-per-case", type=float, default=12.0, help="timed forwards per case: about this long")
    p.add_argument("--iters", type=int, default=6, help="at most this many timed forwards per case (at least 3)")
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
def measure_disk_bandwidth(layers: list[DiskLayer], device: torch.device, max_bytes: int) -> dict:
    """The tier's reads (its reader, its extents, one staging buffer, one thread) of ``layers`` in turn, timed.

    Cycles over ``layers`` until ``max_bytes`` are read; ``layers`` are read layouts (``read_layout``).
    """
    reader = DirectReader([extent.path for layer in layers for extent in layer.extents])
    buffer = lazy_host_buffer(max(layer.staging_bytes for layer in layers))
    if device.type == "cuda":
        register_pinned(buffer)
    read, order = 0, []
    began = time.perf_counter()
    try:
        while read < max_bytes:
            layer = layers[len(order) % len(layers)]
            for extent in layer.extents:
                read += reader.read(extent.path, extent.file_offset, extent.nbytes, buffer.data_ptr() + extent.staging_offset)
            order.append(layer.offload_index)
        seconds = time.perf_counter() - began
    finally:
        if device.type == "cuda":
            unregister_pinned(buffer)
        reader.close()
    return {
        "bytes_per_s": read / seconds,
        "bytes": read,
        "seconds": seconds,
        "layers": order,
        "read_size": max(layer.staging_bytes for layer in layers),
        "o_direct": reader.direct,
        "what": "DirectReader.read of each layer's extents into one page-aligned buffer, one thread, back to back",
    }


CASE = re.compile(r"(half|disk)(\d*)")


def parse_case(case: str) -> tuple[str, int]:
    """``half3`` -> ("half", 3): which layers go to disk, and the ring depth (default STAGING_BUFFERS)."""
    match = CASE.fullmatch(case)
    if match is None:
        raise SystemExit(f"unknown case {case!r}: use half or disk, optionally followed by the ring depth (half3)")
    return match.group(1), int(match.group(2) or STAGING_BUFFERS)


def host_budget(kind: str, staging_buffers: int, sizes: dict) -> int:
    """``half``: the ring plus half the offloaded layers' blocks; ``disk``: the ring alone."""
    ring = staging_buffers * sizes["staging_bytes"]
    if kind == "disk":
        return ring + 4096
    blocks = sizes["block_bytes"]
    return ring + sum(sorted(blocks)[: len(blocks) // 2]) + 4096


def probe_disk(layout, reads: dict[int, DiskLayer], args, device: torch.device, started: float, case: str) -> dict:
    """The disk right before a case: over every offloaded layer in file order, and over the case's in the tier's order."""
    sequential = measure_disk_bandwidth(list(reads.values()), device, args.disk_probe_bytes)
    case_layers = [reads[index] for index in sorted(layout.layers)]
    same = [layer.offload_index for layer in case_layers] == list(reads)
    in_order = sequential if same else measure_disk_bandwidth(case_layers, device, args.disk_probe_bytes)
    log(f"{case}: disk {sequential['bytes_per_s'] / 1e9:.2f} GB/s sequential, {in_order['bytes_per_s'] / 1e9:.2f} GB/s "
        f"in the case's order ({gib(in_order['bytes'])} GiB each, O_DIRECT {sequential['o_direct']})", started)
    return {"sequential": sequential, "case_order": in_order}


def run_case(case: str, args, shape, dtype, directory: Path, device: torch.device, h2d: float, plan, stored, sizes: dict, started: float) -> tuple[dict, torch.Tensor]:
    kind, staging_buffers = parse_case(case)
    budget = host_budget(kind, staging_buffers, sizes)
    layout = plan_disk_tier(plan, stored, budget, staging_buffers)
    reads = {layer.offload_index: read_layout(layer, stored) for layer in plan.offloaded}
    release_memory(device)
    page_cache = drop_page_cache(sorted(directory.glob("*.safetensors")))
    probe = probe_disk(layout, reads, args, device, started, case)
    peak_reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = status_bytes("VmRSS")
    with torch.device("meta"):
        model = llama_like.LlamaLikeDecoder(shape).to(dtype)
    model.inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, shape.head_dim, 2, dtype=torch.float32) / shape.head_dim))
    began = time.perf_counter()
    runtime = prefetch_compile.load_checkpoint(
        model, directory, device, **PLAN, prefetch_step=args.prefetch_step, host_budget=budget, staging_buffers=staging_buffers
    )
    load_s = time.perf_counter() - began
    stats = runtime.stats()
    assert sorted(runtime.disk.layout.layers) == sorted(layout.layers), "the probe read other layers than the tier"

    def limit(disk_bytes_per_s: float | None) -> float | None:
        copied = runtime.plan.copied_bytes_per_forward()  # every layer, at prefetch_step < offloaded layers
        return max(stats.disk_bytes / disk_bytes_per_s, copied / h2d) if disk_bytes_per_s else None

    limit_s = limit(probe["case_order"]["bytes_per_s"])
    log(f"{case}: host_budget {gib(budget)} GiB: {stats.disk_layers}/{stats.offloaded_layers} offloaded layers on disk "
        f"({gib(stats.disk_bytes)} GiB a forward), arena {gib(runtime.host.nbytes)} GiB, ring {staging_buffers} x "
        f"{gib(layout.staging_bytes)} GiB; loaded in {load_s:.1f} s; limit {limit_s * 1e3:.1f} ms/forward", started)
    compiled = torch.compile(model, backend="prefetch_offload", options={"compiler": args.compiler}, dynamic=False)
    tokens = llama_like.sample_tokens(shape, 1, 1, device=device, seed=args.seed)
    marks: list[tuple[float, StreamStats]] = []

    def forward() -> None:
        compiled(tokens)
        marks.append((time.perf_counter(), runtime.disk.stream_stats()))

    with torch.inference_mode():
        warmup_s = wall_time(lambda: [compiled(tokens) for _ in range(args.warmup)], device)
        iters = max(3, min(args.iters, int(args.seconds_per_case / max(limit_s, 1e-6))))
        taken_before, misses_before = disk_reads(runtime), runtime.counters.ensure_misses
        marks.append((time.perf_counter(), runtime.disk.stream_stats()))
        seconds = time_calls(forward, iters, device)
        marks.append((time.perf_counter(), runtime.disk.stream_stats()))  # after the last forward's copies and compute
        taken = disk_reads(runtime) - taken_before
        output = compiled(tokens).float().cpu()
    measured_s = statistics.median(seconds)
    (began_at, first), (ended_at, last) = marks[0], marks[-1]
    stream, wall_s = last - first, ended_at - began_at
    reader_rate = stream.read_bytes_per_s
    result = {
        "case": case,
        "staging_buffers": staging_buffers,
        "host_budget": budget,
        "disk_layers": sorted(layout.layers),
        "stats": {**stats.__dict__, "device_bytes_saved": stats.device_bytes_saved},
        "host_arena_bytes": runtime.host.nbytes,
        "o_direct": runtime.disk.direct,
        "page_cache": page_cache,
        "disk_probe": probe,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "iters": iters,
        "seconds": seconds,
        "ms_per_forward": measured_s * 1e3,
        "limit_ms": limit_s * 1e3,
        "fraction_of_limit": limit_s / measured_s,
        "limit_sequential_ms": limit(probe["sequential"]["bytes_per_s"]) * 1e3,
        "fraction_of_limit_sequential": limit(probe["sequential"]["bytes_per_s"]) / measured_s,
        "limit_reader_ms": limit(reader_rate) * 1e3 if reader_rate else None,
        "fraction_of_limit_reader": limit(reader_rate) / measured_s if reader_rate else None,
        "disk_rate_bytes_per_s": stats.disk_bytes / measured_s,
        "disk_rate_vs_min_bandwidth": stats.disk_bytes / measured_s / min(probe["case_order"]["bytes_per_s"], h2d),
        "stream": {
            "what": "runtime.disk.stream_stats() over the timed forwards (host wall clock, first call to final synchronize)",
            "wall_s": wall_s,
            **stream.__dict__,
            "reader_bytes_per_s": reader_rate,
            "reader_busy_fraction": stream.read_s / wall_s,
            "layers_read_per_forward": stream.layers_read / iters,
        },
        "per_forward": [per_forward(then, now, end - start) for (start, then), (end, now) in zip(marks[:-1], marks[1:-1])],
        # Read ahead shifts reads across a forward's boundary by at most the ring; over many forwards it averages out.
        "disk_reads_per_forward": taken / iters,
        "ensure_misses": runtime.counters.ensure_misses - misses_before,
        "host_rss_before": rss_before,
        "host_peak_rss": status_bytes("VmHWM") if peak_reset else None,
        "device_peak": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }
    if result["host_peak_rss"] is not None:
        result["host_peak_growth"] = result["host_peak_rss"] - rss_before
    log(case_line(result), started)
    runtime.disk.close()  # its pinned ring now, not at some later collection
    del compiled, model, runtime
    return result, output


def per_forward(then: StreamStats, now: StreamStats, host_s: float) -> dict:
    """One timed forward's share of the stream, by the host's clock (the forward's Python returns as the host sees it)."""
    window = now - then
    return {
        "host_s": host_s,
        "layers_read": window.layers_read,
        "reader_bytes_per_s": window.read_bytes_per_s,
        "reader_busy_fraction": window.read_s / host_s,
        "copy_wait_s": window.copy_wait_s,
        "idle_s": window.idle_s,
        "take_wait_s": window.take_wait_s,
        "discarded": window.discarded,
    }


def case_line(case: dict) -> str:
    stream, stats = case["stream"], case["stats"]
    reader = case["stream"]["reader_bytes_per_s"]
    return (
        f"{case['case']:<6} {stats['disk_layers']}/{stats['offloaded_layers']} on disk, ring {case['staging_buffers']}: "
        f"{case['ms_per_forward']:.1f} ms/forward ({case['iters']} timed); limit {case['limit_ms']:.1f} ms from the "
        f"case-order probe ({case['fraction_of_limit']:.3f}), {case['limit_sequential_ms']:.1f} sequential "
        f"({case['fraction_of_limit_sequential']:.3f}), "
        + (f"{case['limit_reader_ms']:.1f} from the reader's rate ({case['fraction_of_limit_reader']:.3f})" if reader else "no reader rate")
        + f"\n       disk {case['disk_probe']['case_order']['bytes_per_s'] / 1e9:.2f} GB/s case-order probe, "
        f"{case['disk_probe']['sequential']['bytes_per_s'] / 1e9:.2f} sequential, "
        + (f"{reader / 1e9:.2f} inside the reader's reads" if reader else "-")
        + f", {case['disk_rate_bytes_per_s'] / 1e9:.2f} delivered; reader busy {stream['reader_busy_fraction']:.3f} of "
        f"{stream['wall_s']:.2f} s, copy-wait {stream['copy_wait_s']:.3f} s, idle {stream['idle_s']:.3f} s; host blocked "
        f"in take {stream['take_wait_s']:.3f} s; discarded {stream['discarded']}; layers read/forward "
        f"{stream['layers_read_per_forward']:.2f} (taken {case['disk_reads_per_forward']:.2f}); ensure misses "
        f"{case['ensure_misses']}; host peak grew {gib(case.get('host_peak_growth'))} GiB; device peak {gib(case['device_peak'])} GiB"
        + "\n       per forward (ms, reader GB/s, busy): "
        + ", ".join(
            f"{f['host_s'] * 1e3:.0f}/{(f['reader_bytes_per_s'] or 0) / 1e9:.2f}/{f['reader_busy_fraction']:.2f}" for f in case["per_forward"]
        )
    )


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

    # 1. The checkpoint.
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
    result["page_cache_before"] = cached_fraction(shards)
    log(f"checkpoint on {result['filesystem']}; cached before: {result['page_cache_before']}", started)

    # 2. The host-to-device bandwidth.
    h2d = measure_h2d_bandwidth(device, args.bw_bytes)
    result["h2d_bandwidth"] = h2d
    log(f"H2D {h2d['bytes_per_s'] / 1e9:.1f} GB/s", started)

    # 3. The cases, each with the disk measured right before it.
    with torch.device("meta"):
        plan = build_plan(llama_like.LlamaLikeDecoder(shape).to(dtype), PlanOptions(**PLAN, prefetch_step=args.prefetch_step))
    stored = read_checkpoint_headers(directory)
    sizes = {
        "staging_bytes": max(read_layout(layer, stored).staging_bytes for layer in plan.offloaded),
        "block_bytes": [layer.nbytes for layer in plan.offloaded],
    }
    cases = args.cases.split(",")
    for case in cases:
        parse_case(case)  # a typo fails before the first case, not after it
    result["cases"], outputs = [], []
    for case in cases:
        case_result, output = run_case(case, args, shape, dtype, directory, device, h2d["bytes_per_s"], plan, stored, sizes, started)
        result["cases"].append(case_result)
        outputs.append(output)
    result["outputs_equal_across_cases"] = all(torch.equal(outputs[0], output) for output in outputs)
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
    print(f"H2D bandwidth          {result['h2d_bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s")
    print(f"checkpoint filesystem  {result['filesystem']}")
    for case in result["cases"]:
        print(case_line(case))
    print(f"outputs equal across cases: {result['outputs_equal_across_cases']}; disk values match: {result['disk_values_match']}")


if __name__ == "__main__":
    main()
