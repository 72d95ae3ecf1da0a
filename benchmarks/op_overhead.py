"""Host time of one ``wait_prefetch`` / ``start_prefetch`` call, in microseconds (no copy involved).

The runtimes record nothing (``stop_recording()``), as after their first timed
forwards. Every offloaded layer fits its own slot here (``prefetch_step`` = layers), so the
calls find their layer resident and do no copy: what is left is the dispatcher's
path into the op and the runtime's bookkeeping, which a forward without CUDA
graphs pays twice per offloaded layer, or twice per chunk with chunked copies
(the ``*_chunk_us`` numbers: ops that name one piece of a chunked plan).
``empty_wait_us`` and ``empty_start_us`` are ops of the same schemas whose
kernels do nothing: the dispatcher's share, a floor for the real ops.

``tiny_forward`` times a whole forward where nothing but the ops' host time and
the copies' can show: a tiny Llama-like decoder (hidden 64, ``--tiny-layers``
blocks, every other one offloaded, one slot), compiled with
``backend="prefetch_offload"`` without CUDA graphs, against the same model
compiled by plain Inductor, against ours with no copies and, on a GPU, against
ours under CUDA graphs (``ours_graphs``), side by side in rounds (median of
``--tiny-calls`` back-to-back forwards per round, each waited for, after
``TINY_WARMUP`` calls, which are past the forwards the runtime records for its
first log line). ``--profile`` records them with ``torch.profiler`` too, and on a GPU says how long kernels waited on the device (``launch_to_start_us``).
``dynamo_entries`` gives, per variant, the compiled entries Dynamo holds for its
function (one: a frame of its own) and how long their guards take to check alone.

``runtime_start_with_copy_us`` is the runtime's ``start`` when it does copy (two
small layers taking turns in one slot): its bookkeeping and the copy's launch (on
the CPU the copy itself, 16 KiB). ``copy_path_us`` (GPU only) times, one at a time in a loop, each CUDA call a
copying ``start`` makes, on that runtime's streams and buffers: which of them
its host time is made of. ``edit_check_per_layer_us`` is the look for in-place edits that the runtime
makes once each time it is entered (a compiled graph, a replay, an eager block
call; see ``prefetch_compile/edits.py``), on 32 offloaded blocks of nine
parameters each (a Llama decoder block's count), divided by the 32 blocks.

    python benchmarks/op_overhead.py [--tiny-layers 16] [--out DIR] [--profile]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import add_repo_to_path, device_name, git_commit, synchronize, wall_time  # noqa: E402

add_repo_to_path()
import llama_like  # noqa: E402  (examples/llama_like.py)

TINY_WARMUP = 8  # the first call compiles; the runtime records forwards 2-4 for its log line


def microseconds_per_call(fn, args: tuple, calls: int = 20000) -> float:
    for _ in range(calls // 10):
        fn(*args)
    began = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - began) / calls * 1e6


def _empty_ops() -> tuple:
    """Ops of ``wait_prefetch``'s and ``start_prefetch``'s schemas whose kernels do nothing.

    Their time per call is the dispatcher's part of the real ops' (argument
    conversion, the call into Python), which no change to the runtime can remove.
    """
    library = torch.library.Library("op_overhead_floor", "DEF")
    library.define("wait(Tensor(a!)[] chunk_params) -> ()")
    library.define("start(Tensor(a!)[] released, Tensor(b!)[] incoming, Tensor[] live) -> ()")
    library.impl("wait", lambda chunk_params: None, "CompositeExplicitAutograd")
    library.impl("start", lambda released, incoming, live: None, "CompositeExplicitAutograd")
    ops = torch.ops.op_overhead_floor
    return library, ops.wait.default, ops.start.default


def _nine_linears() -> nn.Module:
    return nn.Sequential(*(nn.Linear(8, 8, bias=False) for _ in range(9)))


def copy_path_us(runtime) -> dict:
    """µs per call of each CUDA call that the runtime's copying ``start`` makes (on a GPU; empty on the CPU).

    They run on the runtime's own copy stream, events and buffers, the first
    offloaded layer's host and slot blocks for the copy, so the sum can be set
    against ``runtime_start_with_copy_us``. ``driver_copy`` is the copy itself
    (:mod:`prefetch_compile.cuda_driver`); ``torch_copy_on_copy_stream`` is the
    same copy as ``Tensor.copy_`` made it before, the copy stream set and
    restored around it.
    """
    if runtime.device.type != "cuda":
        return {}
    from prefetch_compile.cuda_driver import HostToDevice

    device, copy_stream = runtime.device, runtime.copy_stream
    compute = torch.cuda.current_stream(device)
    event = torch.cuda.Event()
    layer = runtime.offloaded[0]
    source, target = runtime.host.block(layer), runtime.slots.block(layer)

    def torch_copy() -> None:  # the copy as it was made before cuda_driver: on the copy stream, made current
        torch.cuda.set_stream(copy_stream)
        target.copy_(source, non_blocking=True)
        torch.cuda.set_stream(compute)

    calls = {
        "current_stream": (torch.cuda.current_stream, (device,)),
        "is_current_stream_capturing": (torch.cuda.is_current_stream_capturing, ()),
        "current_device": (torch.cuda.current_device, ()),
        "event_record": (event.record, (compute,)),
        "stream_wait_event": (copy_stream.wait_event, (event,)),
        "driver_copy": (HostToDevice().copy, (target.data_ptr(), source.data_ptr(), layer.nbytes, copy_stream.cuda_stream)),
        "torch_copy_on_copy_stream": (torch_copy, ()),
    }
    result = {name: microseconds_per_call(fn, args, calls=5000) for name, (fn, args) in calls.items()}
    result["copy_bytes"] = layer.nbytes
    synchronize(device)
    return result


def tiny_forward(
    device: torch.device, layers: int, calls: int, rounds: int, profile_dir: Path | None = None
) -> dict:
    """Median ms of a tiny decoder's forward: plain Inductor and our variants, side by side.

    ``ours`` offloads every other block through one slot, so each forward copies
    every offloaded block; ``ours_no_copies`` gives each offloaded block a slot of
    its own (``prefetch_step`` = offloaded blocks), so the same ops run and find
    their block in: the two apart are the copies' cost, ``ours_no_copies``
    against Inductor the ops' host time. On a GPU, ``ours_graphs`` is ``ours``
    with ``cuda_graphs``: its replays run no op's host code at all. Each variant
    is compiled once, through a function of its own (:func:`_own_code`), and
    timed in ``rounds`` rounds of ``calls`` forwards each, in turn and then in
    reverse order, so that the host's drift
    falls on all alike; ``ratio*`` are medians of the per-round ratios.
    ``*_host_ms`` is how long the call takes to return, the GPU not waited for:
    where it is close to the wall time, the host sets the pace. With
    ``profile_dir``, each variant's last forwards are recorded by
    ``torch.profiler``: a Chrome trace and a table by host time.
    ``*_in_forward`` times the runtime's ``start`` and ``wait`` inside forwards
    (:func:`_runtime_calls_in_forward`).
    """
    import prefetch_compile

    shape = llama_like.tiny_shape(layers)
    tokens = llama_like.sample_tokens(shape, 1, 8, device)
    offloaded = layers // 2
    # On a GPU also ours under CUDA graphs (the same one-slot plan): replays run none of the ops' host code.
    names = ("inductor", "ours", "ours_no_copies") + (("ours_graphs",) if device.type == "cuda" else ())
    functions = {}
    forwards = {}
    runtimes = {}
    torch._dynamo.reset()
    sources = Path(tempfile.mkdtemp(prefix="op_overhead_"))
    for name in names:
        model = llama_like.build(shape, device, torch.float32)
        functions[name] = _own_code(name, model, sources)
        if name == "inductor":
            forwards[name] = torch.compile(functions[name])
        else:
            step = offloaded if name == "ours_no_copies" else 1
            runtime = prefetch_compile.offload(model, device, group_size=2, prefetch_step=step, chunked_copies=False)
            if name != "ours_graphs":  # whose replays call neither start nor wait (_runtime_calls_in_forward)
                runtimes[name] = runtime
            options = {"cuda_graphs": name == "ours_graphs"}
            forwards[name] = torch.compile(functions[name], backend="prefetch_offload", options=options)
    times: dict[str, list[float]] = {name: [] for name in names}
    host: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for forward in forwards.values():
            for _ in range(TINY_WARMUP):
                forward(tokens)
        for round_ in range(rounds):
            for name in names if round_ % 2 == 0 else reversed(names):
                forward = forwards[name]
                times[name].append(statistics.median(wall_time(lambda: forward(tokens), device) for _ in range(calls)))
                host[name].append(statistics.median(_host_seconds(lambda: forward(tokens), device, calls)))
        result: dict = {"layers": layers, "offloaded": offloaded, "ops_per_forward": 2 * offloaded, "rounds": rounds}
        result["dynamo_entries"] = {name: _dynamo_entries(functions[name], tokens) for name in names}
        for name in names:
            result[f"{name}_ms"] = statistics.median(times[name]) * 1e3
            result[f"{name}_host_ms"] = statistics.median(host[name]) * 1e3
            if profile_dir is not None:
                result[f"{name}_profile"] = _profile(lambda: forwards[name](tokens), device, profile_dir / name)
        for name, runtime in runtimes.items():
            result[f"{name}_in_forward"] = _runtime_calls_in_forward(lambda: forwards[name](tokens), runtime, calls)
    for name in names[1:]:
        per_round = [mine / base for mine, base in zip(times[name], times["inductor"])]
        suffix = name.removeprefix("ours")
        result[f"ratio{suffix}"] = statistics.median(per_round)
        result[f"ratio{suffix}_per_round"] = per_round
    result["extra_us_per_op"] = (result["ours_ms"] - result["inductor_ms"]) * 1e3 / result["ops_per_forward"]
    return result


def _runtime_calls_in_forward(forward, runtime, calls: int) -> dict:
    """Host µs per call of the runtime's ``start`` and ``wait`` inside whole forwards, and their sum per forward.

    The microbenchmarks above time the calls alone, in a tight loop; inside a
    forward they run between kernel launches, with colder caches. The calls
    are timed by wrapping the methods on this runtime instance (the ops find
    them there), which adds some 0.2 µs to each; the wrappers are removed after.
    """
    spent = {"start": [0.0, 0], "wait": [0.0, 0]}

    def timed(method_name: str):
        method = getattr(runtime, method_name)
        tally = spent[method_name]

        def call(*args):
            began = time.perf_counter()
            try:
                return method(*args)
            finally:
                tally[0] += time.perf_counter() - began
                tally[1] += 1

        return call

    for method_name in spent:
        setattr(runtime, method_name, timed(method_name))
    try:
        for _ in range(calls):
            forward()
    finally:
        for method_name in spent:
            delattr(runtime, method_name)
    result = {f"{key}_us": total / count * 1e6 for key, (total, count) in spent.items() if count}
    result["per_forward_us"] = sum(total for total, _ in spent.values()) / calls * 1e6
    return result


def _own_code(name: str, model: nn.Module, directory: Path):
    """A function that calls ``model``, with a code object of its own, from a source file of its own.

    Dynamo keeps its compiled entries per code object, so each variant's function
    holds its own entry alone. A ``functools.partial`` of one shared function
    would not do: ``torch.compile`` wraps it in one function for all, whose entries
    then sit in one list, and a call checks the guards of the entries before its
    own (some 200 µs a forward on the H100 for the entry compiled second). A
    function made by ``exec`` of a string did not do either on torch 2.11: the
    H100 profiles named the three variants' compiled regions 0/0, 0/1 and 0/2,
    one frame recompiled, where torch 2.13 gives each its own frame. So the
    function comes from a file, imported as a module; :func:`_dynamo_entries`
    checks the outcome.
    """
    path = directory / f"forward_{name}.py"
    path.write_text(f"def forward_{name}(tokens):\n    return model(tokens)\n")
    spec = importlib.util.spec_from_file_location(f"op_overhead_forward_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.model = model
    return getattr(module, f"forward_{name}")


def _dynamo_entries(function, tokens: torch.Tensor) -> dict | None:
    """Dynamo's compiled entries for ``function``'s code, and µs per check of each entry's guards.

    One entry means the function was compiled as a frame of its own. The guard
    checks, timed alone with the function's arguments, are the part of a call's
    "TorchDynamo Cache Lookup" that the guards take. Uses private Dynamo
    helpers: None where this torch release lacks them.
    """
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        entries = _debug_get_cache_entry_list(function.__code__)
        checks = [microseconds_per_call(entry.guard_manager.check, ({"tokens": tokens},), calls=2000) for entry in entries]
    except (ImportError, AttributeError, TypeError):
        return None
    return {"entries": len(entries), "guard_check_us": checks}


def _host_seconds(fn, device: torch.device, calls: int) -> list[float]:
    """Seconds each call takes to return, starting from an idle device."""
    seconds = []
    for _ in range(calls):
        synchronize(device)
        began = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - began)
    synchronize(device)
    return seconds


def _profile(fn, device: torch.device, path: Path, calls: int = 10) -> dict:
    """Record ``calls`` calls of ``fn``: a Chrome trace in ``path``.json, the table by host time in ``path``.txt.

    On a GPU, also how long each kernel and copy started after its launch call
    returned (:func:`_launch_delays`): when every delay is a few microseconds the
    device waited for nothing, and the whole forward's time is the host's.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as recorded:
        for _ in range(calls):
            fn()
        synchronize(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    recorded.export_chrome_trace(f"{path}.json")
    table = recorded.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    Path(f"{path}.txt").write_text(table)
    summary: dict = {"table": f"{path}.txt"}
    if device.type == "cuda":
        summary["launch_to_start_us"] = _launch_delays(Path(f"{path}.json"))
    return summary


def _launch_delays(trace: Path) -> dict:
    """Percentiles of the time from a launch call's return to its kernel's or copy's start, in µs.

    A kernel that waits on the GPU (for a copy, through an event) starts long after
    its launch; one launched onto an idle GPU starts a few microseconds after.
    """
    events = [event for event in json.loads(trace.read_text())["traceEvents"] if event.get("ph") == "X"]
    launch_end = {
        event["args"]["correlation"]: event["ts"] + event["dur"]
        for event in events
        if event.get("cat") == "cuda_runtime" and "correlation" in event.get("args", {})
    }
    delays = sorted(
        event["ts"] - launch_end[event["args"]["correlation"]]
        for event in events
        if event.get("cat") in ("kernel", "gpu_memcpy") and event.get("args", {}).get("correlation") in launch_end
    )
    if not delays:
        return {}
    at = lambda q: delays[min(len(delays) - 1, int(q * len(delays)))]  # noqa: E731
    return {"count": len(delays), "p50": at(0.5), "p99": at(0.99), "max": delays[-1]}


def main(argv: list[str] | None = None) -> dict:
    import prefetch_compile
    from prefetch_compile.ops import START, WAIT

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny-layers", type=int, default=16, help="blocks of the tiny decoder (0: skip it)")
    p.add_argument("--tiny-calls", type=int, default=30, help="forwards per variant per round")
    p.add_argument("--tiny-rounds", type=int, default=6)
    p.add_argument("--out", type=Path, default=None, help="directory for op_overhead.json")
    p.add_argument("--profile", action="store_true",
                   help="record the tiny forwards with torch.profiler, into --out/profile (traces and tables)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    whole, chunked = (
        prefetch_compile.offload(
            nn.Sequential(nn.ModuleList(nn.Linear(64, 64) for _ in range(4))),
            device, group_size=1, prefetch_step=4, layers="0", chunked_copies=chunks,
        )
        for chunks in (False, True)
    )
    nine_per_block = prefetch_compile.offload(
        nn.Sequential(nn.ModuleList(_nine_linears() for _ in range(32))),
        device, group_size=1, prefetch_step=1, layers="0",
    )
    # Two layers taking turns in one slot: every start finds its layer absent and copies it.
    turns = prefetch_compile.offload(
        nn.Sequential(nn.ModuleList(nn.Linear(64, 64) for _ in range(2))),
        device, group_size=1, prefetch_step=1, layers="0", chunked_copies=False,
    )
    for runtime in (whole, chunked, nine_per_block, turns):
        runtime.stop_recording()  # the steady state: past the first forwards, which a runtime records for its log
    params = [whole.offloaded_params[p.name] for p in whole.offloaded[0].params]
    piece = [chunked.offloaded_params[chunked.offloaded[0].params[0].name]]  # the weight: piece 0 of 2
    live = [torch.randn(4, device=device)]
    _library, empty_wait, empty_start = _empty_ops()  # the library keeps the ops registered while it lives
    with torch.inference_mode():
        result = {
            "device": device_name(torch.device(device)),
            "torch": torch.__version__,
            "wait_us": microseconds_per_call(WAIT, (params,)),
            "start_us": microseconds_per_call(START, (params, [], live)),
            "wait_chunk_us": microseconds_per_call(WAIT, (piece,)),
            "start_chunk_us": microseconds_per_call(START, (piece, [], live)),
            "empty_wait_us": microseconds_per_call(empty_wait, (params,)),
            "empty_start_us": microseconds_per_call(empty_start, (params, [], live)),
            "runtime_wait_body_us": microseconds_per_call(whole.wait, (0,)),
            "runtime_start_with_copy_us": microseconds_per_call(lambda: (turns.start(0), turns.start(1)), ()) / 2,
            "edit_check_per_layer_us": microseconds_per_call(nine_per_block.settle_edits, ()) / 32,
            "copy_path_us": copy_path_us(turns),
            "commit": git_commit(None),
        }
    if args.tiny_layers:
        profile_dir = (args.out or Path(".")) / "profile" if args.profile else None
        result["tiny_forward"] = tiny_forward(
            torch.device(device), args.tiny_layers, args.tiny_calls, args.tiny_rounds, profile_dir
        )
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "op_overhead.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
