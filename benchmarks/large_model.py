"""A model larger than the GPU, from a checkpoint: write it, load_checkpoint() it, time decode and prefill.

1. The checkpoint. ``--source files`` writes random weights of a Llama-70B-shaped
   decoder (``examples/llama_like.py``) as safetensors shards, one per decoder
   layer plus one for the rest, each tensor generated, written and dropped in
   turn: the writer never holds more than one tensor. A directory already
   holding the same checkpoint (same shape, dtype, seed) is reused.
   ``--source stream`` writes nothing and hands ``load_checkpoint`` a generator
   of the same tensors, one host tensor at a time, for a model larger than the
   disk (the 48-layer 70B shape is 86 GB; the H100 machine has a 64 GiB disk).
   ``--source auto`` (the default) writes files when the disk has room.
2. The load: a meta-built model, ``prefetch_compile.load_checkpoint`` onto the
   device, with the host's resident memory before and its peak after.
3. The timing: ``torch.compile(backend="prefetch_offload")``, decode (``[1, 1]``
   tokens) and prefill (``[1, --prefill]``), median milliseconds per forward
   over back-to-back CUDA-event-timed calls after a warm-up, next to the link
   limit: bytes copied per forward (``OffloadPlan.copied_bytes_per_forward``) / pinned
   host-to-device bandwidth, measured right
   after the timed calls (benchmarks/bench_util.py).

Writes ``large_model.json`` in ``--out`` and prints every number.

GPU (model larger than an 80 GB card, nothing on disk; then the file path at a size the disk holds)::

    python benchmarks/large_model.py --layers 48 --source stream --out out_stream
    python benchmarks/large_model.py --layers 20 --group-size 2 --source files --ckpt-dir /root/ckpt --out out_files

CPU smoke test::

    python benchmarks/large_model.py --device cpu --layers 4 --hidden 64 --intermediate 128 --heads 4 --kv-heads 2 \\
        --vocab 256 --prefill 64 --iters 2 --source files --ckpt-dir /tmp/large_ckpt --out /tmp/large_out
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import (  # noqa: E402
    add_repo_to_path,
    gib,
    log,
    measure_h2d_bandwidth,
    release_memory,
    run_meta,
    status_bytes,
    time_calls,
    wall_time,
)

add_repo_to_path()
import llama_like  # noqa: E402  (examples/llama_like.py)

import prefetch_compile  # noqa: E402
from prefetch_compile.checkpoint import INDEX_NAME  # noqa: E402
from prefetch_compile.memory import param_view  # noqa: E402

SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
DISK_MARGIN = 2 << 30  # leave this much of the disk free when writing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_shape_arguments(p, llama_like.LlamaShape(vocab=128256, hidden=8192, intermediate=28672, heads=64, kv_heads=8, layers=48))
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--num-in-group", type=int, default=1)
    p.add_argument("--prefetch-step", type=int, default=2)
    p.add_argument("--cuda-graphs", action="store_true", help="compile with options={'cuda_graphs': True}")
    p.add_argument("--source", default="auto", choices=["auto", "files", "stream"])
    p.add_argument("--ckpt-dir", default="large_model_ckpt", help="where --source files writes (or finds) the shards")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep shards this run wrote (default: delete at the end)")
    p.add_argument("--prefill", type=int, default=2048, help="prefill length")
    p.add_argument("--iters", type=int, default=10, help="timed forwards per case")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards per case (the first compiles)")
    p.add_argument("--bw-bytes", type=int, default=1 << 30, help="bytes per bandwidth-measuring copy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--commit", default=None, help="git commit to record (default: git rev-parse, if available)")
    p.add_argument("--out", default="large_model_out", help="output directory (large_model.json)")
    return p.parse_args(argv)


def add_shape_arguments(p: argparse.ArgumentParser, default: llama_like.LlamaShape) -> None:
    """``--layers``, ``--hidden``, ... ``--dtype``: the decoder a checkpoint benchmark writes (see :func:`shape_of`)."""
    p.add_argument("--layers", type=int, default=default.layers, help=f"decoder layers (default {default.layers})")
    p.add_argument("--hidden", type=int, default=default.hidden)
    p.add_argument("--intermediate", type=int, default=default.intermediate)
    p.add_argument("--heads", type=int, default=default.heads)
    p.add_argument("--kv-heads", type=int, default=default.kv_heads)
    p.add_argument("--vocab", type=int, default=default.vocab)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])


def shape_of(args: argparse.Namespace) -> llama_like.LlamaShape:
    return llama_like.LlamaShape(
        vocab=args.vocab, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads, kv_heads=args.kv_heads, layers=args.layers
    )


# ---------------------------------------------------------------- the checkpoint
def tensor_specs(shape: llama_like.LlamaShape, dtype: torch.dtype) -> list[tuple[str, tuple[int, ...]]]:
    """Every (name, shape) of the model's state dict, from a meta-built model."""
    with torch.device("meta"):
        model = llama_like.LlamaLikeDecoder(shape)
    return [(name, tuple(tensor.shape)) for name, tensor in model.state_dict().items()]


def make_tensor(index: int, name: str, size: tuple[int, ...], dtype: torch.dtype, seed: int, device: torch.device) -> torch.Tensor:
    """The same values for the same (seed, index) whether written to files or streamed: norm gains are ones."""
    if name.endswith("norm.weight"):
        return torch.ones(size, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
    values = torch.empty(size, dtype=dtype, device=device).normal_(0.0, 0.02, generator=generator)
    return values.cpu()  # what a reader hands over: one host tensor


def shard_of(name: str) -> str:
    """One shard per decoder layer, one for the embedding, final norm and head."""
    parts = name.split(".")
    return f"layer-{int(parts[1]):03d}.safetensors" if parts[0] == "layers" else "rest.safetensors"


def stream(specs, dtype, seed, device) -> Iterator[tuple[str, torch.Tensor]]:
    for index, (name, size) in enumerate(specs):
        yield name, make_tensor(index, name, size, dtype, seed, device)


def checkpoint_metadata(args: argparse.Namespace) -> dict:
    keys = ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "dtype", "seed")
    return {key: str(getattr(args, key)) for key in keys}


def write_checkpoint(directory: Path, specs, dtype: torch.dtype, seed: int, device: torch.device, metadata: dict) -> None:
    """Shard by shard, tensor by tensor: each safetensors header is known from the shapes alone."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / INDEX_NAME).unlink(missing_ok=True)  # an index marks a complete checkpoint: written last
    by_shard: dict[str, list[tuple[int, str, tuple[int, ...]]]] = {}
    for index, (name, size) in enumerate(specs):
        by_shard.setdefault(shard_of(name), []).append((index, name, size))
    began = time.perf_counter()
    written = 0
    for shard_number, (shard, entries) in enumerate(sorted(by_shard.items())):
        header, offset = {}, 0
        for _, name, size in entries:
            nbytes = dtype.itemsize * _numel(size)
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(size), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes
        with open(directory / shard, "wb") as file:
            file.write(len(encoded).to_bytes(8, "little"))
            file.write(encoded)
            for index, name, size in entries:
                tensor = make_tensor(index, name, size, dtype, seed, device).contiguous()
                file.write(memoryview((ctypes.c_char * tensor.nbytes).from_address(tensor.data_ptr())))
                written += tensor.nbytes
                del tensor
        if shard_number % 8 == 0 or shard_number == len(by_shard) - 1:
            elapsed = time.perf_counter() - began
            log(f"  wrote {shard_number + 1}/{len(by_shard)} shards, {gib(written)} GiB, {written / elapsed / 2**30:.2f} GiB/s")
    weight_map = {name: shard_of(name) for name, _ in specs}
    index = {"metadata": {"total_size": written, **metadata}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index))


def existing_checkpoint_matches(directory: Path, metadata: dict) -> bool:
    index = directory / INDEX_NAME
    if not index.is_file():
        return False
    stored = json.loads(index.read_text()).get("metadata", {})
    return all(stored.get(key) == value for key, value in metadata.items())


def _numel(size: tuple[int, ...]) -> int:
    count = 1
    for dim in size:
        count *= dim
    return count


# ---------------------------------------------------------------- measuring
def resident_bytes() -> int:
    return status_bytes("VmRSS") or 0


def peak_resident_bytes() -> int:
    """The peak resident memory of this address space (``VmHWM``; ``ru_maxrss`` would count a parent's too)."""
    return status_bytes("VmHWM") or 0


def time_case(compiled, tokens: torch.Tensor, args: argparse.Namespace, device: torch.device) -> dict:
    with torch.inference_mode():
        warmup_s = wall_time(lambda: [compiled(tokens) for _ in range(args.warmup)], device)
        seconds = time_calls(lambda: compiled(tokens), args.iters, device)
    return {"tokens": list(tokens.shape), "warmup_s": warmup_s, "seconds": seconds, "ms_per_forward": statistics.median(seconds) * 1e3}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype)
    shape = shape_of(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    specs = tensor_specs(shape, dtype)
    model_bytes = sum(_numel(size) for _, size in specs) * dtype.itemsize
    result: dict = {
        "meta": run_meta(
            device,
            args,
            shape={**shape.__dict__, "params": shape.num_params()},
            model_bytes=model_bytes,
            device_total_bytes=torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None,
        )
    }
    log(f"model: {shape.layers} layers, hidden {shape.hidden}, {shape.num_params() / 1e9:.1f}B parameters, "
        f"{gib(model_bytes)} GiB in {args.dtype}; device {result['meta']['device']}"
        + (f" ({gib(result['meta']['device_total_bytes'])} GiB)" if device.type == "cuda" else ""), started)
    if device.type == "cuda":
        torch.zeros(1, device=device)  # the CUDA context is part of the baseline, not of the load

    # 1. The checkpoint.
    directory = Path(args.ckpt_dir)
    metadata = checkpoint_metadata(args)
    source = args.source
    reused = source != "stream" and existing_checkpoint_matches(directory, metadata)
    wrote = False
    if source == "auto" and not reused:
        probe = directory if directory.exists() else directory.resolve().parent
        free = shutil.disk_usage(probe).free
        source = "files" if free >= model_bytes + DISK_MARGIN else "stream"
        log(f"source auto: {gib(free)} GiB free on disk for a {gib(model_bytes)} GiB checkpoint -> {source}", started)
    elif source == "auto":
        source = "files"
    if source == "files" and not reused:
        probe = directory if directory.exists() else directory.resolve().parent
        free = shutil.disk_usage(probe).free
        if free < model_bytes + DISK_MARGIN:
            raise SystemExit(
                f"{gib(free)} GiB free under {probe}, the checkpoint needs {gib(model_bytes)} GiB (+{gib(DISK_MARGIN)} GiB margin): "
                "use --source stream, fewer --layers, or another --ckpt-dir"
            )
        log(f"writing {gib(model_bytes)} GiB of shards to {directory}", started)
        began = time.perf_counter()
        write_checkpoint(directory, specs, dtype, args.seed, device, metadata)
        wrote = True
        result["write_s"] = time.perf_counter() - began
        log(f"wrote the checkpoint in {result['write_s']:.1f} s; host peak so far {gib(peak_resident_bytes())} GiB", started)
    elif reused:
        log(f"reusing the checkpoint already in {directory}", started)
    result["source"] = source

    # 2. The load.
    with torch.device("meta"):
        model = llama_like.LlamaLikeDecoder(shape).to(dtype)
    model.inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, shape.head_dim, 2, dtype=torch.float32) / shape.head_dim))
    checkpoint = directory if source == "files" else stream(specs, dtype, args.seed, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline = resident_bytes()
    peak_before = peak_resident_bytes()
    log(f"loading ({source}); host resident {gib(baseline)} GiB, peak so far {gib(peak_before)} GiB", started)
    began = time.perf_counter()
    runtime = prefetch_compile.load_checkpoint(
        model, checkpoint, device,
        group_size=args.group_size, num_in_group=args.num_in_group, prefetch_step=args.prefetch_step,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    load_s = time.perf_counter() - began
    stats = runtime.stats()
    result["load"] = {
        "seconds": load_s,
        "bytes_per_s": model_bytes / load_s,
        "host_resident_before": baseline,
        "host_peak_before": peak_before,
        "host_peak_after": peak_resident_bytes(),
        "host_resident_after": resident_bytes(),
        "device_peak": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "stats": {**stats.__dict__, "device_bytes_saved": stats.device_bytes_saved},
    }
    grown = result["load"]["host_peak_after"] - baseline
    log(f"loaded in {load_s:.1f} s ({model_bytes / load_s / 2**30:.2f} GiB/s): {stats.offloaded_layers}/{stats.total_layers} layers, "
        f"{gib(stats.offloaded_bytes)} GiB offloaded; host peak grew {gib(grown)} GiB (arena {gib(runtime.host.nbytes)} GiB); "
        f"device {gib(result['load']['device_peak'])} GiB peak", started)
    check_placement(model, runtime, specs, dtype, args.seed, device, started)
    if wrote and not args.keep_checkpoint:
        for name in {shard_of(name) for name, _ in specs} | {INDEX_NAME}:
            (directory / name).unlink()
        log(f"deleted the shards written to {directory} (--keep-checkpoint keeps them)", started)

    # 3. The timing.
    options = {"cuda_graphs": True} if args.cuda_graphs else {}
    compiled = torch.compile(model, backend="prefetch_offload", options=options, dynamic=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result["cases"] = {}
    for name, (batch, seq) in (("decode_b1", (1, 1)), (f"prefill_{args.prefill}", (1, args.prefill))):
        tokens = llama_like.sample_tokens(shape, batch, seq, device=device, seed=args.seed)
        log(f"{name}: warm-up (compiles) and {args.iters} timed forwards", started)
        result["cases"][name] = time_case(compiled, tokens, args, device)
        log(f"{name}: {result['cases'][name]['ms_per_forward']:.2f} ms/forward", started)
    result["run_device_peak"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    result["host_peak"] = peak_resident_bytes()  # before the bandwidth probe's own pinned gigabyte

    del compiled
    release_memory(device)
    result["h2d_bandwidth"] = measure_h2d_bandwidth(device, args.bw_bytes)
    bandwidth = result["h2d_bandwidth"]["bytes_per_s"]
    limit_ms = runtime.plan.copied_bytes_per_forward() / bandwidth * 1e3
    for case in result["cases"].values():
        case["link_limit_ms"] = limit_ms
        case["fraction_of_link_limit"] = limit_ms / case["ms_per_forward"]
    (out / "large_model.json").write_text(json.dumps(result, indent=1))
    print_summary(result, stats, limit_ms, bandwidth)
    log(f"wrote {out / 'large_model.json'}", started)


def check_placement(model, runtime, specs, dtype: torch.dtype, seed: int, device: torch.device, started: float) -> None:
    """Spot-check the load: one offloaded and one kept weight matrix hold the checkpoint's values.

    The smallest of each (a key projection, 16 MB at 70B), so the check adds no gigabytes to the host's peak.
    """
    indices = {name: index for index, (name, _) in enumerate(specs)}
    sizes = dict(specs)
    matrices = [name for name, size in specs if len(size) == 2]
    placements = {p.name: (layer, p) for layer in runtime.offloaded for p in layer.params}
    offloaded = min((name for name in matrices if name in placements), key=lambda name: _numel(sizes[name]), default=None)
    kept = min((name for name in matrices if name not in placements), key=lambda name: _numel(sizes[name]))
    for name in filter(None, (offloaded, kept)):
        want = make_tensor(indices[name], name, sizes[name], dtype, seed, device)
        if name in placements:
            layer, placement = placements[name]
            got = param_view(runtime.host.block(layer), placement)
        else:
            got = model.get_parameter(name).cpu()
        if not torch.equal(got, want):
            raise SystemExit(f"placement check failed: {name} does not hold the checkpoint's values")
    log(f"placement check: {offloaded} (host arena) and {kept} (device) hold the checkpoint's values", started)


def print_summary(result: dict, stats, limit_ms: float, bandwidth: float) -> None:
    load = result["load"]
    print()
    print(f"device                 {result['meta']['device']}")
    print(f"model                  {gib(result['meta']['model_bytes'])} GiB, {stats.total_layers} layers, source {result['source']}")
    print(f"offloaded              {stats.offloaded_layers} layers, {gib(stats.offloaded_bytes)} GiB; "
          f"slots {gib(stats.slot_pool_bytes)} GiB; kept on device {gib(stats.kept_device_bytes)} GiB")
    print(f"load                   {load['seconds']:.1f} s ({load['bytes_per_s'] / 2**30:.2f} GiB/s)")
    print(f"host RSS               before load {gib(load['host_resident_before'])} GiB, peak after load "
          f"{gib(load['host_peak_after'])} GiB (grew {gib(load['host_peak_after'] - load['host_resident_before'])} GiB), "
          f"peak over the run {gib(result['host_peak'])} GiB")
    print(f"device peak            load {gib(load['device_peak'])} GiB, forwards {gib(result['run_device_peak'])} GiB")
    print(f"H2D bandwidth          {bandwidth / 1e9:.1f} GB/s -> link limit {limit_ms:.2f} ms/forward")
    for name, case in result["cases"].items():
        print(f"{name:<22} {case['ms_per_forward']:.2f} ms/forward, {case['fraction_of_link_limit']:.3f} of the link limit")


if __name__ == "__main__":
    main()
